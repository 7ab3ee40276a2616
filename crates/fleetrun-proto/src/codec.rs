//! The only place that knows how messages become bytes.
//!
//! A frame is a 4-byte big-endian length followed by that many bytes of bincode. bincode 1.3 is
//! frozen upstream; keeping it behind these functions means swapping it touches one file.

use bincode::Options;
use bytes::{Buf, BufMut, Bytes, BytesMut};
use serde::{Serialize, de::DeserializeOwned};

use crate::{MAX_FRAME_LEN, TaskDown, TaskRequest};

const HEADER_LEN: usize = 4;

fn options() -> impl Options + Copy {
    bincode::DefaultOptions::new()
        .with_limit(MAX_FRAME_LEN as u64)
        .reject_trailing_bytes()
}

/// Encoding a message failed.
#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    /// The message would exceed [`MAX_FRAME_LEN`].
    #[error("message of {0} bytes exceeds the frame limit")]
    TooLarge(u64),
    /// The serializer refused the value.
    #[error("cannot encode message: {0}")]
    Serialize(String),
}

/// Decoding a frame failed; the stream it came from cannot be trusted any further.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// The header announced more than [`MAX_FRAME_LEN`] bytes.
    #[error("frame of {0} bytes exceeds the limit of {MAX_FRAME_LEN}")]
    TooLarge(usize),
    /// The bytes are not a valid message of the expected type.
    #[error("malformed frame: {0}")]
    Malformed(String),
    /// The stream ended in the middle of a frame.
    #[error("stream ended inside a frame")]
    Truncated,
}

/// Encodes `msg` as one frame: header and body.
pub fn encode_frame<T: Serialize>(msg: &T) -> Result<Bytes, EncodeError> {
    let opts = options();
    let len = opts.serialized_size(msg).map_err(|e| match *e {
        bincode::ErrorKind::SizeLimit => EncodeError::TooLarge(MAX_FRAME_LEN as u64 + 1),
        other => EncodeError::Serialize(other.to_string()),
    })?;
    if len > MAX_FRAME_LEN as u64 {
        return Err(EncodeError::TooLarge(len));
    }
    let mut buf = BytesMut::with_capacity(HEADER_LEN + len as usize);
    buf.put_u32(len as u32);
    let mut writer = buf.writer();
    opts.serialize_into(&mut writer, msg)
        .map_err(|e| EncodeError::Serialize(e.to_string()))?;
    Ok(writer.into_inner().freeze())
}

/// A [`TaskDown::Run`] encoded once for every host of a step.
///
/// Only the task id differs between the hosts' requests, so each host's frame is a small head
/// (length, message start, task id, script length) followed by the script and the rest of the
/// request, both shared by all the hosts: a script sent to a thousand hosts stays one buffer.
/// The frames are byte for byte what [`encode_frame`] makes of the whole request.
#[derive(Clone)]
pub struct SharedTaskRequest {
    /// The request with an empty script.
    request: TaskRequest,
    script: Bytes,
    script_len: Bytes,
    /// Everything after the script.
    tail: Bytes,
}

impl std::fmt::Debug for SharedTaskRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedTaskRequest")
            .field("request", &self.request)
            .field("script_len", &self.script.len())
            .finish_non_exhaustive()
    }
}

impl SharedTaskRequest {
    /// Encodes `request` with `script` in place of its own (which is ignored).
    pub fn new(mut request: TaskRequest, script: Bytes) -> Result<Self, EncodeError> {
        request.script = Vec::new();
        // The fields after the script, in declaration order: a tuple and a struct encode alike.
        let tail = serialize(&(
            &request.script_param,
            request.is_param_sensitive,
            &request.account,
            request.timeout_secs,
            request.output_limit,
            &request.windows_interpreter,
        ))?;
        // A byte string's length is encoded as a u64.
        let script_len = serialize(&(script.len() as u64))?;
        let shared = Self {
            request,
            script,
            script_len: script_len.into(),
            tail: tail.into(),
        };
        // Refuses a request past the frame limit now rather than for every host.
        shared.frame(uuid::Uuid::nil())?;
        Ok(shared)
    }

    /// The frame of one host's request: pieces to write in order.
    pub fn frame(&self, task_id: uuid::Uuid) -> Result<[Bytes; 3], EncodeError> {
        let mut request = self.request.clone();
        request.task_id = task_id;
        let empty = serialize(&TaskDown::Run(request))?;
        // `empty` is the head, the one-byte length of the empty script, and the tail.
        let head = &empty[..empty.len() - 1 - self.tail.len()];
        let len = head.len() + self.script_len.len() + self.script.len() + self.tail.len();
        if len > MAX_FRAME_LEN {
            return Err(EncodeError::TooLarge(len as u64));
        }
        let mut first = BytesMut::with_capacity(HEADER_LEN + head.len() + self.script_len.len());
        first.put_u32(len as u32);
        first.put_slice(head);
        first.put_slice(&self.script_len);
        Ok([first.freeze(), self.script.clone(), self.tail.clone()])
    }

    /// Bytes of the shared script.
    pub fn script_len(&self) -> usize {
        self.script.len()
    }
}

fn serialize<T: Serialize>(value: &T) -> Result<Vec<u8>, EncodeError> {
    options()
        .serialize(value)
        .map_err(|e| EncodeError::Serialize(e.to_string()))
}

/// Accumulates bytes from a stream and yields whole frames.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    buf: BytesMut,
}

impl FrameDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends bytes read from the stream.
    pub fn extend(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next whole message, `Ok(None)` if more bytes are needed.
    pub fn decode<T: DeserializeOwned>(&mut self) -> Result<Option<T>, DecodeError> {
        if self.buf.len() < HEADER_LEN {
            return Ok(None);
        }
        let len = u32::from_be_bytes(self.buf[..HEADER_LEN].try_into().unwrap()) as usize;
        if len > MAX_FRAME_LEN {
            return Err(DecodeError::TooLarge(len));
        }
        if self.buf.len() < HEADER_LEN + len {
            // Reserve once for the whole frame rather than growing chunk by chunk.
            self.buf.reserve(HEADER_LEN + len - self.buf.len());
            return Ok(None);
        }
        self.buf.advance(HEADER_LEN);
        let body = self.buf.split_to(len);
        if self.buf.is_empty() {
            // Lets the frame's buffer go with the frame instead of living as long as the stream.
            self.buf = BytesMut::new();
        }
        options()
            .deserialize(&body)
            .map(Some)
            .map_err(|e| DecodeError::Malformed(e.to_string()))
    }

    /// Call at the end of the stream: an error if a partial frame is left.
    pub fn finish(&self) -> Result<(), DecodeError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::Truncated)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::*;
    use proptest::prelude::*;

    fn sample_request(script: Vec<u8>, param: String) -> TaskDown {
        TaskDown::Run(TaskRequest {
            task_id: uuid::Uuid::from_u128(7),
            job_instance_id: 1,
            step_instance_id: 2,
            script_language: 1,
            script,
            script_param: param,
            is_param_sensitive: false,
            account: "root".into(),
            timeout_secs: 10,
            output_limit: 5 << 20,
            windows_interpreter: None,
        })
    }

    #[test]
    fn version_2_keeps_what_version_1_peers_send_and_read() {
        // The frames a version 1 peer exchanges encode as they did: the hello, the welcome,
        // heartbeats, a cancel and the first report.
        let welcome = HelloReply::Welcome {
            bk_host_id: 7,
            heartbeat_interval_ms: 5000,
        };
        assert_eq!(
            encode_frame(&welcome).unwrap().to_vec(),
            [0, 0, 0, 5, 0, 14, 251, 136, 19]
        );
        assert_eq!(
            encode_frame(&ControlUp::Heartbeat { running_tasks: 2 })
                .unwrap()
                .to_vec(),
            [0, 0, 0, 2, 0, 2]
        );
        assert_eq!(
            encode_frame(&TaskDown::Cancel).unwrap().to_vec(),
            [0, 0, 0, 1, 1]
        );
        assert_eq!(
            encode_frame(&TaskUp::Started { started_at_ms: 5 })
                .unwrap()
                .to_vec(),
            [0, 0, 0, 2, 0, 10]
        );
        // What version 2 adds round-trips.
        let held = ControlUp::Holding {
            tasks: vec![crate::HeldTask {
                task_id: uuid::Uuid::from_u128(9),
                job_instance_id: 1,
                step_instance_id: 2,
                bk_host_id: 3,
                execute_count: 0,
                acked_offset: 4,
                produced: 5,
                started_at_ms: Some(6),
                finished: true,
            }],
        };
        let downs = [
            TaskDown::Resume {
                task_id: uuid::Uuid::from_u128(9),
                from_offset: 4,
            },
            TaskDown::Discard {
                task_id: uuid::Uuid::from_u128(9),
            },
            TaskDown::ResultStored,
        ];
        let mut dec = FrameDecoder::new();
        dec.extend(&encode_frame(&held).unwrap());
        assert_eq!(dec.decode::<ControlUp>().unwrap(), Some(held));
        for down in downs {
            dec.extend(&encode_frame(&down).unwrap());
            assert_eq!(dec.decode::<TaskDown>().unwrap(), Some(down));
        }
        let lost = TaskUp::SpoolLost {
            offset: 1,
            bytes: 2,
        };
        dec.extend(&encode_frame(&lost).unwrap());
        assert_eq!(dec.decode::<TaskUp>().unwrap(), Some(lost));
    }

    #[test]
    fn frames_split_anywhere_decode_whole() {
        let msgs = vec![
            TaskUp::Started { started_at_ms: 5 },
            TaskUp::Output {
                offset: 0,
                data: b"hello\n".to_vec(),
            },
            TaskUp::Finished(TaskResult {
                ending: Ending::Exited { code: 3 },
                started_at_ms: 5,
                finished_at_ms: 9,
                output_bytes: 6,
                survivors: 0,
                message: None,
            }),
        ];
        let wire: Vec<u8> = msgs
            .iter()
            .flat_map(|m| encode_frame(m).unwrap().to_vec())
            .collect();
        let mut dec = FrameDecoder::new();
        let mut got = Vec::new();
        for byte in wire {
            dec.extend(&[byte]);
            while let Some(m) = dec.decode::<TaskUp>().unwrap() {
                got.push(m);
            }
        }
        dec.finish().unwrap();
        assert_eq!(got, msgs);
    }

    #[test]
    fn oversized_header_is_refused_before_buffering() {
        let mut dec = FrameDecoder::new();
        dec.extend(&u32::MAX.to_be_bytes());
        assert!(matches!(
            dec.decode::<TaskUp>(),
            Err(DecodeError::TooLarge(_))
        ));
    }

    #[test]
    fn oversized_message_is_not_encoded() {
        let msg = sample_request(vec![0; MAX_FRAME_LEN + 1], String::new());
        assert!(matches!(encode_frame(&msg), Err(EncodeError::TooLarge(_))));
    }

    #[test]
    fn trailing_bytes_and_partial_frames_are_errors() {
        let mut frame = encode_frame(&ControlUp::Heartbeat { running_tasks: 1 })
            .unwrap()
            .to_vec();
        frame.push(0);
        let len = (frame.len() - 4) as u32;
        frame[..4].copy_from_slice(&len.to_be_bytes());
        let mut dec = FrameDecoder::new();
        dec.extend(&frame);
        assert!(matches!(
            dec.decode::<ControlUp>(),
            Err(DecodeError::Malformed(_))
        ));

        let mut dec = FrameDecoder::new();
        dec.extend(&[0, 0, 0, 9, 1]);
        assert!(dec.decode::<ControlUp>().unwrap().is_none());
        assert!(matches!(dec.finish(), Err(DecodeError::Truncated)));
    }

    fn joined(pieces: &[Bytes]) -> Vec<u8> {
        pieces.iter().flat_map(|p| p.iter().copied()).collect()
    }

    #[test]
    fn shared_task_frames_are_the_whole_requests_frames() {
        // Script lengths on both sides of every change in the length's encoding.
        for len in [0, 1, 250, 251, 65_535, 65_536, 1 << 20] {
            let script: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let mut request = match sample_request(script.clone(), "a b 'c'".into()) {
                TaskDown::Run(r) => r,
                _ => unreachable!(),
            };
            request.windows_interpreter = Some("pwsh".into());
            let shared = SharedTaskRequest::new(request.clone(), Bytes::from(script)).unwrap();
            for id in [uuid::Uuid::nil(), uuid::Uuid::new_v4()] {
                request.task_id = id;
                let whole = encode_frame(&TaskDown::Run(request.clone())).unwrap();
                let pieces = shared.frame(id).unwrap();
                assert_eq!(joined(&pieces), whole.to_vec(), "script of {len} bytes");
            }
        }
    }

    #[test]
    fn shared_task_frames_share_the_script() {
        let script = Bytes::from(vec![7u8; 4096]);
        let request = match sample_request(Vec::new(), String::new()) {
            TaskDown::Run(r) => r,
            _ => unreachable!(),
        };
        let shared = SharedTaskRequest::new(request, script.clone()).unwrap();
        let a = shared.frame(uuid::Uuid::new_v4()).unwrap();
        let b = shared.frame(uuid::Uuid::new_v4()).unwrap();
        assert_eq!(a[1].as_ptr(), script.as_ptr());
        assert_eq!(b[1].as_ptr(), script.as_ptr());
        assert!(a[0].len() < 64, "the per-host head is small");
    }

    #[test]
    fn oversized_shared_request_is_refused() {
        let request = match sample_request(Vec::new(), String::new()) {
            TaskDown::Run(r) => r,
            _ => unreachable!(),
        };
        let script = Bytes::from(vec![0u8; MAX_FRAME_LEN]);
        assert!(matches!(
            SharedTaskRequest::new(request, script),
            Err(EncodeError::TooLarge(_))
        ));
    }

    proptest! {
        #[test]
        fn task_requests_round_trip(script in proptest::collection::vec(any::<u8>(), 0..4096), param in ".*") {
            let msg = sample_request(script.clone(), param);
            if let TaskDown::Run(request) = &msg {
                let shared = SharedTaskRequest::new(request.clone(), Bytes::from(script)).unwrap();
                prop_assert_eq!(joined(&shared.frame(request.task_id).unwrap()), encode_frame(&msg).unwrap().to_vec());
            }
            let mut dec = FrameDecoder::new();
            dec.extend(&encode_frame(&msg).unwrap());
            prop_assert_eq!(dec.decode::<TaskDown>().unwrap(), Some(msg));
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut dec = FrameDecoder::new();
            dec.extend(&bytes);
            for _ in 0..4 {
                let _ = dec.decode::<TaskDown>();
                let _ = dec.decode::<Hello>();
            }
        }
    }
}
