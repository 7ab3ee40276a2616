//! The events of `stream_job`: one JSON object a line, told apart by `type`.

use serde::{Deserialize, Serialize};

use crate::{HostStatus, JobStatus};

/// One line of `stream_job`'s newline-delimited JSON.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum StreamEvent {
    /// The job's status: first, whenever it changes, and last with `finished` true.
    Job {
        job_instance_id: i64,
        step_instance_id: i64,
        status: JobStatus,
        finished: bool,
    },
    /// A host's state: once for each host at the start, then whenever it changes.
    Host {
        bk_host_id: i64,
        bk_cloud_id: i64,
        ip: String,
        status: HostStatus,
        exit_code: Option<i32>,
        tag: String,
        finished: bool,
    },
    /// Output of a host: the log's bytes from `offset` to `next_offset`, as text (a character
    /// split between two chunks waits for its end).
    Output {
        bk_host_id: i64,
        offset: i64,
        next_offset: i64,
        data: String,
    },
    /// The stream ends without the job's end: reconnect with the offsets read to resume.
    Error { message: String },
    /// Nothing happened for a while: the connection still lives.
    Ping,
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn events_are_tagged_by_type() {
        let cases = [
            (
                StreamEvent::Job {
                    job_instance_id: 5,
                    step_instance_id: 6,
                    status: JobStatus::Running,
                    finished: false,
                },
                json!({"type": "job", "job_instance_id": 5, "step_instance_id": 6, "status": 2, "finished": false}),
            ),
            (
                StreamEvent::Host {
                    bk_host_id: 1,
                    bk_cloud_id: 0,
                    ip: "10.0.0.1".into(),
                    status: HostStatus::NonZeroExit,
                    exit_code: Some(3),
                    tag: String::new(),
                    finished: true,
                },
                json!({"type": "host", "bk_host_id": 1, "bk_cloud_id": 0, "ip": "10.0.0.1", "status": 104, "exit_code": 3, "tag": "", "finished": true}),
            ),
            (
                StreamEvent::Output {
                    bk_host_id: 1,
                    offset: 0,
                    next_offset: 6,
                    data: "hello\n".into(),
                },
                json!({"type": "output", "bk_host_id": 1, "offset": 0, "next_offset": 6, "data": "hello\n"}),
            ),
            (
                StreamEvent::Error {
                    message: "stop".into(),
                },
                json!({"type": "error", "message": "stop"}),
            ),
            (StreamEvent::Ping, json!({"type": "ping"})),
        ];
        for (event, value) in cases {
            assert_eq!(serde_json::to_value(&event).unwrap(), value);
            assert_eq!(serde_json::from_value::<StreamEvent>(value).unwrap(), event);
        }
    }
}
