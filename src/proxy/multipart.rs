//! Just enough `multipart/form-data` (RFC 7578) to pull one field out of a buffered body.

use bytes::Bytes;

use super::request::RequestAdapterError;

fn err(msg: impl Into<String>) -> RequestAdapterError {
    RequestAdapterError::Multipart(msg.into())
}

fn boundary(content_type: &str) -> Option<&str> {
    let (mime, params) = content_type.split_once(';')?;
    if !mime.trim().eq_ignore_ascii_case("multipart/form-data") {
        return None;
    }
    params.split(';').find_map(|p| {
        let (k, v) = p.split_once('=')?;
        k.trim()
            .eq_ignore_ascii_case("boundary")
            .then(|| v.trim().trim_matches('"'))
    })
}

fn find(hay: &[u8], needle: &[u8], from: usize) -> Option<usize> {
    hay.get(from..)?
        .windows(needle.len())
        .position(|w| w == needle)
        .map(|p| p + from)
}

fn field_name(headers: &str) -> Option<&str> {
    headers
        .lines()
        .find(|l| l.to_ascii_lowercase().starts_with("content-disposition:"))
        .and_then(|l| {
            l.split(';')
                .find_map(|p| p.trim().strip_prefix("name=").map(|n| n.trim_matches('"')))
        })
}

/// The bytes of the part named `name`.
pub fn field(content_type: &str, body: &Bytes, name: &str) -> Result<Bytes, RequestAdapterError> {
    let b = boundary(content_type)
        .ok_or_else(|| err("Content-Type is not multipart/form-data with a boundary"))?;
    let delim = format!("--{b}").into_bytes();
    let mut pos = find(body, &delim, 0).ok_or_else(|| err("no boundary in body"))?;
    loop {
        let start = pos + delim.len();
        if body.get(start..start + 2) == Some(b"--") {
            return Err(RequestAdapterError::Missing(format!(
                "multipart field `{name}`"
            )));
        }
        let head_start = start + 2; // CRLF after the boundary line
        let head_end =
            find(body, b"\r\n\r\n", head_start).ok_or_else(|| err("part without headers"))?;
        let content_start = head_end + 4;
        let mut next_delim = b"\r\n".to_vec();
        next_delim.extend_from_slice(&delim);
        let content_end =
            find(body, &next_delim, content_start).ok_or_else(|| err("unterminated part"))?;
        let headers = std::str::from_utf8(&body[head_start..head_end])
            .map_err(|_| err("part headers are not UTF-8"))?;
        if field_name(headers) == Some(name) {
            return Ok(body.slice(content_start..content_end));
        }
        pos = content_end + 2;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_named_field() {
        let body = Bytes::from_static(
            b"--XyZ\r\nContent-Disposition: form-data; name=\"meta\"\r\n\r\nhello\r\n--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.png\"\r\nContent-Type: image/png\r\n\r\n\x89PNG\r\n\x00\r\n--XyZ--\r\n",
        );
        let ct = "multipart/form-data; boundary=XyZ";
        assert_eq!(
            field(ct, &body, "file").unwrap(),
            Bytes::from_static(b"\x89PNG\r\n\x00")
        );
        assert_eq!(
            field(ct, &body, "meta").unwrap(),
            Bytes::from_static(b"hello")
        );
        assert!(matches!(
            field(ct, &body, "nope"),
            Err(RequestAdapterError::Missing(_))
        ));
        assert!(field("application/json", &body, "file").is_err());
    }
}
