//! The floor under any tokio proxy: requests and answers are framed with `httparse` and passed on
//! byte for byte, one upstream connection per client connection, laid out as the guard serves
//! (one single-threaded runtime per I/O thread, all accepting from one socket). It does less than
//! a reverse proxy must (no header rewriting, no chunked bodies, no pooling, no timeouts), so it is
//! for measuring only: `FLOOR=tokio scripts/bench_proxy.sh` runs it in the hyper floor's place to
//! show what the runtime and the kernel cost a proxy on this machine, with no HTTP library and no
//! guard in the way.
//!
//! ```text
//! cargo run --release --example tokio_floor -- --listen 127.0.0.1:18486 --upstream http://127.0.0.1:18481
//! ```

#[path = "support/floor.rs"]
mod floor;

use std::io;
use std::net::SocketAddr;

use anyhow::Context as _;
use bytes::{Buf, BytesMut};
use clap::Parser as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Which side of the exchange a buffer holds: the two differ only in their first line.
#[derive(Clone, Copy)]
enum Side {
    Request,
    Response,
}

/// Parses the head at the start of `buf`: `Some((head length, body length))` once it is whole.
fn frame(buf: &[u8], side: Side) -> io::Result<Option<(usize, usize)>> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let parsed = match side {
        Side::Request => httparse::Request::new(&mut headers).parse(buf),
        Side::Response => httparse::Response::new(&mut headers).parse(buf),
    };
    let head = match parsed.map_err(io::Error::other)? {
        httparse::Status::Complete(n) => n,
        httparse::Status::Partial => return Ok(None),
    };
    let body = headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
        .map(|h| {
            std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse::<usize>().ok())
                .ok_or_else(|| io::Error::other("bad content-length"))
        })
        .transpose()?
        .unwrap_or(0);
    Ok(Some((head, body)))
}

/// Reads until `buf` starts with one whole message; returns its length (0: the peer closed).
async fn read_message(stream: &mut TcpStream, buf: &mut BytesMut, side: Side) -> io::Result<usize> {
    loop {
        if let Some((head, body)) = frame(buf, side)?
            && buf.len() >= head + body
        {
            return Ok(head + body);
        }
        if stream.read_buf(buf).await? == 0 {
            return if buf.is_empty() {
                Ok(0)
            } else {
                Err(io::ErrorKind::UnexpectedEof.into())
            };
        }
    }
}

async fn relay(mut client: TcpStream, upstream: SocketAddr) -> io::Result<()> {
    let mut up = TcpStream::connect(upstream).await?;
    up.set_nodelay(true)?;
    let (mut from_client, mut from_up) =
        (BytesMut::with_capacity(8192), BytesMut::with_capacity(8192));
    loop {
        let n = read_message(&mut client, &mut from_client, Side::Request).await?;
        if n == 0 {
            return Ok(());
        }
        up.write_all(&from_client[..n]).await?;
        from_client.advance(n);
        let n = read_message(&mut up, &mut from_up, Side::Response).await?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        client.write_all(&from_up[..n]).await?;
        from_up.advance(n);
    }
}

fn main() -> anyhow::Result<()> {
    let args = floor::Args::parse();
    let authority = args
        .upstream
        .authority()
        .context("--upstream has no host:port")?;
    let upstream: SocketAddr = authority
        .as_str()
        .parse()
        .with_context(|| format!("--upstream {authority} is not an IP address and port"))?;
    floor::serve_per_core(args.listen, args.threads, || {
        move |stream| async move {
            let _ = relay(stream, upstream).await;
        }
    })
}
