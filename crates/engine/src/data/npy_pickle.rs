//! Just enough of Python's pickle to read one pickled numpy array (`pickle.dump(ndarray)`), and the
//! Animal-MNIST loader built on it.
//!
//! A pickled ndarray is `_reconstruct(ndarray, (0,), b'b')` followed by BUILD with the state
//! `(version, shape, dtype, is_fortran, raw_bytes)`, where `dtype` is itself `dtype(code, False,
//! True)` + BUILD `(3, byte_order, ...)`. A tiny stack machine over the opcodes numpy emits
//! rebuilds that structure; the array is then validated (globals, dtype, C order, byte count)
//! instead of trusting fixed offsets. No code is ever executed: globals are only names.

use std::ops::Range;
use std::path::Path;

use super::{Dataset, Pixels, format_err, read_gzip};
use crate::{EngineError, LabelId, Result};

/// Element types this reader accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NdDtype {
    /// `|u1`
    U8,
    /// `<i8`
    I64Le,
}

impl NdDtype {
    fn size(self) -> usize {
        match self {
            NdDtype::U8 => 1,
            NdDtype::I64Le => 8,
        }
    }
}

/// A numpy array found in a pickle: shape, element type and where its raw bytes lie in the
/// (decompressed) pickle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NdArray {
    pub shape: Vec<usize>,
    pub dtype: NdDtype,
    pub data: Range<usize>,
}

#[derive(Debug, Clone)]
enum Value {
    Mark,
    None,
    Bool(bool),
    Int(i64),
    Str(String),
    Bytes(Range<usize>),
    Tuple(Vec<Value>),
    Global(String),
    Reduce(Box<Value>, Box<Value>),
    Build(Box<Value>, Box<Value>),
}

/// Parses a pickle holding exactly one C-ordered numpy array of a supported dtype.
pub fn parse_ndarray_pickle(bytes: &[u8]) -> std::result::Result<NdArray, String> {
    let root = run(bytes)?;
    let (reconstruct, state) = match root {
        Value::Build(obj, state) => (*obj, *state),
        _ => return Err("the pickle does not hold a numpy array".into()),
    };
    match reconstruct {
        Value::Reduce(f, _) if is_global(&f, "multiarray._reconstruct") => {}
        _ => return Err("the pickle does not hold a numpy array (no _reconstruct)".into()),
    }
    let Value::Tuple(items) = state else {
        return Err("array state is not a tuple".into());
    };
    let [_version, shape, dtype, fortran, data] = items.as_slice() else {
        return Err(format!(
            "array state has {} fields, expected 5",
            items.len()
        ));
    };
    let shape = match shape {
        Value::Tuple(dims) => dims
            .iter()
            .map(|d| match d {
                Value::Int(n) if *n >= 0 => Ok(*n as usize),
                other => Err(format!("bad dimension {other:?}")),
            })
            .collect::<std::result::Result<Vec<_>, _>>()?,
        other => return Err(format!("shape is {other:?}, not a tuple")),
    };
    if !matches!(fortran, Value::Bool(false)) {
        return Err("array is not in C order".into());
    }
    let dtype = parse_dtype(dtype)?;
    let Value::Bytes(data) = data else {
        return Err("array data is not a bytes object".into());
    };
    let count = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
    if count.and_then(|c| c.checked_mul(dtype.size())) != Some(data.len()) {
        return Err(format!(
            "shape {shape:?} of {dtype:?} needs {count:?} elements, the data blob has {} bytes",
            data.len()
        ));
    }
    Ok(NdArray {
        shape,
        dtype,
        data: data.clone(),
    })
}

fn is_global(v: &Value, suffix: &str) -> bool {
    matches!(v, Value::Global(name) if name.starts_with("numpy") && name.ends_with(suffix))
}

fn parse_dtype(v: &Value) -> std::result::Result<NdDtype, String> {
    let Value::Build(obj, state) = v else {
        return Err("dtype is not a built object".into());
    };
    let Value::Reduce(f, args) = obj.as_ref() else {
        return Err("dtype is not a reduced object".into());
    };
    if !is_global(f, ".dtype") {
        return Err(format!("dtype built by {f:?}"));
    }
    let code = match args.as_ref() {
        Value::Tuple(a) => match a.first() {
            Some(Value::Str(s)) => s.as_str(),
            _ => return Err("dtype without a type code".into()),
        },
        _ => return Err("dtype arguments are not a tuple".into()),
    };
    let order = match state.as_ref() {
        Value::Tuple(s) => match s.get(1) {
            Some(Value::Str(o)) => o.as_str(),
            _ => return Err("dtype state without a byte order".into()),
        },
        _ => return Err("dtype state is not a tuple".into()),
    };
    match (code, order) {
        ("u1", "|") => Ok(NdDtype::U8),
        ("i8", "<") => Ok(NdDtype::I64Le),
        _ => Err(format!("unsupported dtype {order}{code}")),
    }
}

/// A bounds-checked reader over the pickle bytes.
struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> std::result::Result<Range<usize>, String> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.bytes.len())
            .ok_or_else(|| format!("truncated at byte {}", self.pos))?;
        let r = self.pos..end;
        self.pos = end;
        Ok(r)
    }

    fn le<const N: usize>(&mut self) -> std::result::Result<[u8; N], String> {
        let r = self.take(N)?;
        let mut out = [0u8; N];
        out.copy_from_slice(&self.bytes[r]);
        Ok(out)
    }

    fn u8(&mut self) -> std::result::Result<usize, String> {
        Ok(usize::from(self.le::<1>()?[0]))
    }

    fn u32(&mut self) -> std::result::Result<usize, String> {
        Ok(u32::from_le_bytes(self.le()?) as usize)
    }

    fn str(&mut self, n: usize) -> std::result::Result<String, String> {
        let r = self.take(n)?;
        String::from_utf8(self.bytes[r].to_vec()).map_err(|e| e.to_string())
    }

    fn line(&mut self) -> std::result::Result<String, String> {
        let rest = &self.bytes[self.pos..];
        let n = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or("unterminated GLOBAL")?;
        let s = self.str(n)?;
        self.pos += 1;
        Ok(s)
    }
}

/// Runs the opcodes numpy's pickles use and returns the value left by STOP.
fn run(bytes: &[u8]) -> std::result::Result<Value, String> {
    let mut r = Reader { bytes, pos: 0 };
    let mut stack: Vec<Value> = Vec::new();
    let mut memo: Vec<Value> = Vec::new();
    let pop = |stack: &mut Vec<Value>| stack.pop().ok_or_else(|| "stack underflow".to_string());
    loop {
        let at = r.pos;
        let op = r.u8()? as u8;
        match op {
            0x80 => {
                r.u8()?; // PROTO
            }
            0x95 => {
                r.take(8)?; // FRAME: framing is only a read-ahead hint
            }
            b'.' => return pop(&mut stack),
            b'(' => stack.push(Value::Mark),
            b'N' => stack.push(Value::None),
            0x88 => stack.push(Value::Bool(true)),
            0x89 => stack.push(Value::Bool(false)),
            b'K' => stack.push(Value::Int(r.u8()? as i64)),
            b'M' => stack.push(Value::Int(i64::from(u16::from_le_bytes(r.le()?)))),
            b'J' => stack.push(Value::Int(i64::from(i32::from_le_bytes(r.le()?)))),
            0x8c => {
                let n = r.u8()?;
                stack.push(Value::Str(r.str(n)?));
            }
            b'X' => {
                let n = r.u32()?;
                stack.push(Value::Str(r.str(n)?));
            }
            b'C' => {
                let n = r.u8()?;
                stack.push(Value::Bytes(r.take(n)?));
            }
            b'B' => {
                let n = r.u32()?;
                stack.push(Value::Bytes(r.take(n)?));
            }
            0x8e => {
                let n = usize::try_from(u64::from_le_bytes(r.le()?)).map_err(|e| e.to_string())?;
                stack.push(Value::Bytes(r.take(n)?));
            }
            b')' => stack.push(Value::Tuple(Vec::new())),
            0x85..=0x87 => {
                let n = usize::from(op - 0x84);
                if stack.len() < n {
                    return Err("stack underflow".into());
                }
                let items = stack.split_off(stack.len() - n);
                stack.push(Value::Tuple(items));
            }
            b't' => {
                let mark = stack
                    .iter()
                    .rposition(|v| matches!(v, Value::Mark))
                    .ok_or("TUPLE without MARK")?;
                let items = stack.split_off(mark + 1);
                stack.pop();
                stack.push(Value::Tuple(items));
            }
            0x93 => {
                let name = pop(&mut stack)?;
                let module = pop(&mut stack)?;
                match (module, name) {
                    (Value::Str(m), Value::Str(n)) => stack.push(Value::Global(format!("{m}.{n}"))),
                    _ => return Err("STACK_GLOBAL on non-strings".into()),
                }
            }
            b'c' => {
                let module = r.line()?;
                let name = r.line()?;
                stack.push(Value::Global(format!("{module}.{name}")));
            }
            b'R' => {
                let args = pop(&mut stack)?;
                let f = pop(&mut stack)?;
                stack.push(Value::Reduce(Box::new(f), Box::new(args)));
            }
            b'b' => {
                let state = pop(&mut stack)?;
                let obj = pop(&mut stack)?;
                stack.push(Value::Build(Box::new(obj), Box::new(state)));
            }
            0x94 => {
                let top = stack.last().ok_or("MEMOIZE on empty stack")?.clone();
                memo.push(top);
            }
            b'q' | b'r' => {
                let idx = if op == b'q' { r.u8()? } else { r.u32()? };
                let top = stack.last().ok_or("PUT on empty stack")?.clone();
                if idx >= memo.len() {
                    memo.resize(idx + 1, Value::None);
                }
                memo[idx] = top;
            }
            b'h' | b'j' => {
                let idx = if op == b'h' { r.u8()? } else { r.u32()? };
                let v = memo
                    .get(idx)
                    .ok_or_else(|| format!("GET of unknown memo {idx}"))?;
                stack.push(v.clone());
            }
            _ => return Err(format!("unsupported pickle opcode {op:#04x} at byte {at}")),
        }
    }
}

/// Reads one gzip'd pickled array, checking its rank and dtype.
fn read_array(path: &Path, rank: usize, dtype: NdDtype) -> Result<(Vec<u8>, NdArray)> {
    let bytes = read_gzip(path)?;
    let arr =
        parse_ndarray_pickle(&bytes).map_err(|e| format_err(path, "pickled numpy array", e))?;
    if arr.shape.len() != rank || arr.dtype != dtype {
        return Err(format_err(
            path,
            "pickled numpy array",
            format!(
                "{:?} of shape {:?}, expected rank {rank} {dtype:?}",
                arr.dtype, arr.shape
            ),
        ));
    }
    Ok((bytes, arr))
}

/// Animal-MNIST 0.4 classes, in the order the package description lists them. The description
/// does not state the label order, so these names are indicative only.
const ANIMAL_CLASSES: [&str; 10] = [
    "bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra",
];

/// Loads Animal-MNIST from `dir` (the `animal-mnist` folder of the data directory):
/// `animal_data_version_3.gz` (uint8 N×28×28) and `animal_label_version_3.gz` (int64 N).
pub fn animal_mnist(dir: &Path) -> Result<Dataset> {
    let data_path = dir.join("animal_data_version_3.gz");
    let label_path = dir.join("animal_label_version_3.gz");
    let (bytes, images) = read_array(&data_path, 3, NdDtype::U8)?;
    if images.shape[1..] != [28, 28] {
        return Err(format_err(
            &data_path,
            "Animal-MNIST images",
            format!("shape {:?}, expected N×28×28", images.shape),
        ));
    }
    let (lbytes, labels) = read_array(&label_path, 1, NdDtype::I64Le)?;
    if labels.shape[0] != images.shape[0] {
        return Err(format_err(
            &label_path,
            "Animal-MNIST labels",
            format!("{} labels for {} images", labels.shape[0], images.shape[0]),
        ));
    }
    let labels = lbytes[labels.data]
        .chunks_exact(8)
        .map(|b| {
            let mut le = [0u8; 8];
            le.copy_from_slice(b);
            let v = i64::from_le_bytes(le);
            usize::try_from(v)
                .ok()
                .filter(|&l| l < ANIMAL_CLASSES.len())
                .map(|l| LabelId(l as u32))
                .ok_or_else(|| format_err(&label_path, "Animal-MNIST labels", format!("label {v}")))
        })
        .collect::<Result<Vec<_>, EngineError>>()?;
    Dataset::new(
        "animal-mnist",
        [1, 28, 28],
        Pixels::U8(bytes[images.data].to_vec()),
        labels,
        ANIMAL_CLASSES.iter().map(|s| s.to_string()).collect(),
    )
}
