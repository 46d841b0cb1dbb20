//! A streaming validator for chunked message bodies.
//!
//! The proxy forwards chunked bodies as they are; this decoder only walks the framing to find
//! where the body ends and to refuse malformed framing (a request smuggling vector) before any
//! byte of it reaches the next hop. Line endings must be CRLF.

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ChunkError {
    #[error("invalid chunk size line")]
    BadSize,
    #[error("chunk size too large")]
    SizeOverflow,
    #[error("chunk data not followed by CRLF")]
    MissingCrlf,
    #[error("chunk extension or trailer section too long")]
    TooLong,
}

/// Longest chunk-size line (with extensions) accepted.
const MAX_SIZE_LINE: usize = 4096;
/// Largest trailer section accepted.
const MAX_TRAILERS: usize = 64 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    SizeStart,
    Size,
    /// Whitespace after the size, before `;` or CR.
    SizeSpace,
    Extension,
    SizeLf,
    Data,
    DataCr,
    DataLf,
    TrailerStart,
    Trailer,
    TrailerLf,
    FinalLf,
    Done,
}

#[derive(Debug, Clone)]
pub struct ChunkedDecoder {
    state: State,
    size: u64,
    line: usize,
    trailers: usize,
    last_chunk: bool,
}

impl Default for ChunkedDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl ChunkedDecoder {
    pub fn new() -> Self {
        Self {
            state: State::SizeStart,
            size: 0,
            line: 0,
            trailers: 0,
            last_chunk: false,
        }
    }

    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Walks `data`; returns how many bytes belong to the body. When the body ends inside
    /// `data`, the returned count stops there and `is_done()` turns true.
    pub fn feed(&mut self, data: &[u8]) -> Result<usize, ChunkError> {
        self.feed_with(data, |_| {})
    }

    /// Like `feed`, and reports each run of chunk payload (without framing) in `data` to
    /// `payload`, in order: what a de-chunking reader passes on.
    pub fn feed_with(
        &mut self,
        data: &[u8],
        mut payload: impl FnMut(std::ops::Range<usize>),
    ) -> Result<usize, ChunkError> {
        let mut i = 0;
        while i < data.len() && self.state != State::Done {
            if self.state == State::Data {
                // Skip whole runs of chunk data at once.
                let take = usize::try_from(self.size)
                    .unwrap_or(usize::MAX)
                    .min(data.len() - i);
                payload(i..i + take);
                i += take;
                self.size -= take as u64;
                if self.size == 0 {
                    self.state = State::DataCr;
                }
                continue;
            }
            self.step(data[i])?;
            i += 1;
        }
        Ok(i)
    }

    fn step(&mut self, b: u8) -> Result<(), ChunkError> {
        use State::*;
        match self.state {
            SizeStart | Size => match hex(b) {
                Some(d) => {
                    if self.size >> 60 != 0 {
                        return Err(ChunkError::SizeOverflow);
                    }
                    self.size = self.size << 4 | u64::from(d);
                    self.state = Size;
                    self.line += 1;
                }
                None if self.state == SizeStart => return Err(ChunkError::BadSize),
                None => self.after_size(b)?,
            },
            SizeSpace => self.after_size(b)?,
            Extension => {
                self.line += 1;
                if self.line > MAX_SIZE_LINE {
                    return Err(ChunkError::TooLong);
                }
                match b {
                    b'\r' => self.state = SizeLf,
                    b'\n' | 0 => return Err(ChunkError::BadSize),
                    _ => {}
                }
            }
            SizeLf => {
                if b != b'\n' {
                    return Err(ChunkError::BadSize);
                }
                self.line = 0;
                if self.size == 0 {
                    self.last_chunk = true;
                    self.state = TrailerStart;
                } else {
                    self.state = Data;
                }
            }
            Data => unreachable!("handled in feed"),
            DataCr => {
                if b != b'\r' {
                    return Err(ChunkError::MissingCrlf);
                }
                self.state = DataLf;
            }
            DataLf => {
                if b != b'\n' {
                    return Err(ChunkError::MissingCrlf);
                }
                self.state = SizeStart;
            }
            TrailerStart => {
                self.count_trailer()?;
                match b {
                    b'\r' => self.state = FinalLf,
                    b'\n' | b' ' | b'\t' => return Err(ChunkError::BadSize),
                    _ => self.state = Trailer,
                }
            }
            Trailer => {
                self.count_trailer()?;
                match b {
                    b'\r' => self.state = TrailerLf,
                    b'\n' | 0 => return Err(ChunkError::BadSize),
                    _ => {}
                }
            }
            TrailerLf => {
                self.count_trailer()?;
                if b != b'\n' {
                    return Err(ChunkError::BadSize);
                }
                self.state = TrailerStart;
            }
            FinalLf => {
                if b != b'\n' {
                    return Err(ChunkError::BadSize);
                }
                debug_assert!(self.last_chunk);
                self.state = Done;
            }
            Done => {}
        }
        Ok(())
    }

    fn after_size(&mut self, b: u8) -> Result<(), ChunkError> {
        self.line += 1;
        match b {
            b'\r' => self.state = State::SizeLf,
            b';' => self.state = State::Extension,
            b' ' | b'\t' => self.state = State::SizeSpace,
            _ => return Err(ChunkError::BadSize),
        }
        Ok(())
    }

    fn count_trailer(&mut self) -> Result<(), ChunkError> {
        self.trailers += 1;
        if self.trailers > MAX_TRAILERS {
            return Err(ChunkError::TooLong);
        }
        Ok(())
    }
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn whole(body: &[u8]) -> Result<(usize, bool), ChunkError> {
        let mut d = ChunkedDecoder::new();
        let n = d.feed(body)?;
        Ok((n, d.is_done()))
    }

    #[test]
    fn complete_body_with_extension_and_trailer() {
        let body = b"5;name=v\r\nhello\r\nA\r\n0123456789\r\n0\r\nX-T: 1\r\n\r\nNEXT";
        assert_eq!(whole(body), Ok((body.len() - 4, true)));
    }

    #[test]
    fn byte_by_byte_equals_whole() {
        let body = b"3\r\nabc\r\n0\r\n\r\n";
        let mut d = ChunkedDecoder::new();
        let mut total = 0;
        for b in body {
            total += d.feed(std::slice::from_ref(b)).unwrap();
        }
        assert!(d.is_done());
        assert_eq!(total, body.len());
    }

    #[test]
    fn payload_runs_exclude_framing() {
        let body = b"5;x=1\r\nhello\r\n6\r\n world\r\n0\r\n\r\n";
        let mut d = ChunkedDecoder::new();
        let mut out = Vec::new();
        d.feed_with(body, |r| out.extend_from_slice(&body[r]))
            .unwrap();
        assert!(d.is_done());
        assert_eq!(out, b"hello world");
    }

    #[test]
    fn incomplete_is_not_done() {
        assert_eq!(whole(b"5\r\nhel"), Ok((6, false)));
    }

    #[test]
    fn malformed_is_refused() {
        for bad in [
            &b"x\r\n"[..],
            b"5\nhello\r\n",
            b"5\r\nhelloXX",
            b"\r\n",
            b"-1\r\n",
            b"fffffffffffffffff\r\n",
            b"0\r\n\n",
            b"5 x\r\n",
        ] {
            assert!(whole(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn long_extension_is_refused() {
        let mut body = b"1;".to_vec();
        body.extend(std::iter::repeat_n(b'a', MAX_SIZE_LINE + 1));
        assert_eq!(whole(&body), Err(ChunkError::TooLong));
    }
}
