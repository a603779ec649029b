//! Length-prefixed bincode frames as a `tokio_util` codec.
//!
//! A frame is a `u32` big-endian payload length, then the payload: one message encoded with
//! bincode 2's standard configuration and a decode limit. The length is checked against the
//! connection's limit *before* any buffer is grown for the payload, so a hostile 4 GiB prefix
//! costs nothing. A payload must decode to exactly one message with no bytes left over.

use std::marker::PhantomData;

use bincode::enc::write::{SizeWriter, Writer};
use bincode::error::EncodeError;
use bincode::{Decode, Encode};
use bytes::{Buf, BufMut, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

/// Default limit on a frame's payload (4 MiB).
pub const DEFAULT_MAX_FRAME: usize = 4 * 1024 * 1024;

/// Hard ceiling for any configured frame limit (64 MiB). Also bincode's decode limit, which
/// bounds what a lying length field inside a payload can make the decoder allocate.
pub const MAX_FRAME_LIMIT: usize = 64 * 1024 * 1024;

const LEN_BYTES: usize = 4;

/// bincode's configuration on the wire.
pub fn wire_config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<MAX_FRAME_LIMIT>()
}

/// Why a frame could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge { len: u64, max: u64 },
    #[error("malformed frame: {0}")]
    Malformed(String),
    #[error("encode failed: {0}")]
    Encode(String),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
}

impl From<FrameError> for crate::Error {
    fn from(e: FrameError) -> Self {
        match e {
            FrameError::TooLarge { len, max } => crate::Error::FrameTooLarge { len, max },
            FrameError::Malformed(reason) => crate::Error::Malformed(reason),
            other => crate::Error::Malformed(other.to_string()),
        }
    }
}

/// Decodes frames into `In` and encodes `Out` into frames.
#[derive(Debug)]
pub struct FrameCodec<In, Out> {
    max_frame: usize,
    _types: PhantomData<fn(Out) -> In>,
}

impl<In, Out> FrameCodec<In, Out> {
    /// A codec with the given payload limit (clamped to [`MAX_FRAME_LIMIT`]).
    pub fn new(max_frame: usize) -> Self {
        FrameCodec {
            max_frame: max_frame.min(MAX_FRAME_LIMIT),
            _types: PhantomData,
        }
    }

    /// The payload limit.
    pub fn max_frame(&self) -> usize {
        self.max_frame
    }
}

impl<In, Out> Default for FrameCodec<In, Out> {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_FRAME)
    }
}

impl<In: Decode<()>, Out> Decoder for FrameCodec<In, Out> {
    type Item = In;
    type Error = FrameError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<In>, FrameError> {
        if src.len() < LEN_BYTES {
            return Ok(None);
        }
        let mut len_bytes = [0u8; LEN_BYTES];
        len_bytes.copy_from_slice(&src[..LEN_BYTES]);
        let len = u32::from_be_bytes(len_bytes) as usize;
        if len > self.max_frame {
            return Err(FrameError::TooLarge {
                len: len as u64,
                max: self.max_frame as u64,
            });
        }
        if src.len() < LEN_BYTES + len {
            // Safe to reserve: `len` is within the limit.
            src.reserve(LEN_BYTES + len - src.len());
            return Ok(None);
        }
        src.advance(LEN_BYTES);
        let payload = src.split_to(len);
        let (message, used) = bincode::decode_from_slice(&payload, wire_config())
            .map_err(|e| FrameError::Malformed(e.to_string()))?;
        if used != len {
            return Err(FrameError::Malformed(format!(
                "{} trailing bytes after the message",
                len - used
            )));
        }
        Ok(Some(message))
    }
}

impl<In, Out: Encode> Encoder<Out> for FrameCodec<In, Out> {
    type Error = FrameError;

    fn encode(&mut self, item: Out, dst: &mut BytesMut) -> Result<(), FrameError> {
        encode_frame(&item, self.max_frame, dst)
    }
}

/// Appends one frame holding `item` to `dst`. On error `dst` is left as it was.
///
/// `max_frame` is clamped to [`MAX_FRAME_LIMIT`] (so the length always fits the `u32`
/// prefix), and the payload is written through a writer that stops at the limit: an oversized
/// message costs at most `max_frame` bytes of buffer before it is refused, however large it is.
pub fn encode_frame<T: Encode>(
    item: &T,
    max_frame: usize,
    dst: &mut BytesMut,
) -> Result<(), FrameError> {
    let max_frame = max_frame.min(MAX_FRAME_LIMIT);
    let start = dst.len();
    dst.put_u32(0);
    let mut writer = LimitedWriter {
        dst: &mut *dst,
        remaining: max_frame,
        exceeded: false,
    };
    let written = bincode::encode_into_writer(item, &mut writer, wire_config());
    let exceeded = writer.exceeded;
    let remaining = writer.remaining;
    if let Err(e) = written {
        dst.truncate(start);
        if exceeded {
            // Measure the whole message (without buffering it) to report its real size.
            let mut size = SizeWriter::default();
            let len = match bincode::encode_into_writer(item, &mut size, wire_config()) {
                Ok(()) => size.bytes_written as u64,
                Err(_) => max_frame as u64 + 1,
            };
            return Err(FrameError::TooLarge {
                len,
                max: max_frame as u64,
            });
        }
        return Err(FrameError::Encode(e.to_string()));
    }
    let len = max_frame - remaining;
    // Cannot truncate: `len <= max_frame <= MAX_FRAME_LIMIT < u32::MAX`.
    dst[start..start + LEN_BYTES].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(())
}

/// Appends to a frame's buffer and fails instead of growing it past the frame limit.
struct LimitedWriter<'a> {
    dst: &'a mut BytesMut,
    remaining: usize,
    exceeded: bool,
}

impl Writer for LimitedWriter<'_> {
    fn write(&mut self, bytes: &[u8]) -> Result<(), EncodeError> {
        if bytes.len() > self.remaining {
            self.exceeded = true;
            return Err(EncodeError::Other("frame limit exceeded"));
        }
        self.dst.extend_from_slice(bytes);
        self.remaining -= bytes.len();
        Ok(())
    }
}

/// Encodes a value with the wire configuration (no frame header); used for stored records.
pub fn to_bytes<T: Encode>(item: &T) -> Result<Vec<u8>, FrameError> {
    bincode::encode_to_vec(item, wire_config()).map_err(|e| FrameError::Encode(e.to_string()))
}

/// Decodes a value encoded by [`to_bytes`], requiring that all bytes are used.
pub fn from_bytes<T: Decode<()>>(bytes: &[u8]) -> Result<T, FrameError> {
    let (value, used) = bincode::decode_from_slice(bytes, wire_config())
        .map_err(|e| FrameError::Malformed(e.to_string()))?;
    if used != bytes.len() {
        return Err(FrameError::Malformed(format!(
            "{} trailing bytes",
            bytes.len() - used
        )));
    }
    Ok(value)
}
