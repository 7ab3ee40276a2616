//! What we know of a job: its status and each host's state and output, built from the stream's
//! events (or from the polling APIs), and what bk-job's status numbers mean to an operator.

use std::{
    collections::{HashMap, VecDeque},
    hash::{DefaultHasher, Hasher},
};

use fleetrun_api::{HostStatus, JobStatus};
use serde_json::{Value, json};
use unicode_width::UnicodeWidthStr;

/// Output lines kept per host for the summary when the whole output is not kept.
const TAIL_LINES: usize = 10;

/// One job, as far as we have heard.
#[derive(Debug)]
pub struct JobView {
    pub job_instance_id: i64,
    pub step_instance_id: Option<i64>,
    pub name: Option<String>,
    pub status: Option<i32>,
    /// The stream's final job event arrived: every host's output is here.
    pub finished: bool,
    pub total_time_ms: Option<i64>,
    pub hosts: Vec<HostView>,
    index: HashMap<i64, usize>,
    keep_output: bool,
}

#[derive(Debug)]
pub struct HostView {
    pub bk_host_id: i64,
    pub bk_cloud_id: i64,
    pub ip: String,
    pub status: i32,
    pub exit_code: Option<i32>,
    pub tag: String,
    /// Where the next output event of this host starts: what to resume from.
    pub next_offset: i64,
    pub output: Captured,
}

/// A host's output: its identity (length and hash, to fold identical outputs), its last lines,
/// and the whole text when asked for.
#[derive(Debug, Default)]
pub struct Captured {
    pub full: Option<String>,
    pub bytes: u64,
    hasher: DefaultHasher,
    pub lines: u64,
    pub tail: VecDeque<String>,
    pub partial: String,
}

impl Captured {
    fn keeping_all(keep: bool) -> Self {
        Self {
            full: keep.then(String::new),
            ..Self::default()
        }
    }

    pub fn push(&mut self, text: &str) {
        if let Some(full) = &mut self.full {
            full.push_str(text);
        }
        self.bytes += text.len() as u64;
        self.hasher.write(text.as_bytes());
        let mut rest = text;
        while let Some(end) = rest.find('\n') {
            self.partial.push_str(&rest[..end]);
            self.lines += 1;
            self.tail.push_back(std::mem::take(&mut self.partial));
            if self.tail.len() > TAIL_LINES {
                self.tail.pop_front();
            }
            rest = &rest[end + 1..];
        }
        self.partial.push_str(rest);
    }

    /// Equal for equal outputs (up to a hash collision, with equal lengths too).
    pub fn identity(&self) -> (u64, u64) {
        (self.bytes, self.hasher.finish())
    }

    /// The last lines, with an unfinished last line as a line.
    pub fn last_lines(&self) -> Vec<&str> {
        let mut lines: Vec<&str> = self.tail.iter().map(String::as_str).collect();
        if !self.partial.is_empty() {
            lines.push(&self.partial);
            if lines.len() > TAIL_LINES {
                lines.remove(0);
            }
        }
        lines
    }

    pub fn total_lines(&self) -> u64 {
        self.lines + u64::from(!self.partial.is_empty())
    }
}

/// What an event changed.
#[derive(Debug, PartialEq, Eq)]
pub enum Change {
    Nothing,
    Job,
    /// A host's state; its index in [`JobView::hosts`].
    Host(usize),
    /// New output of a host: its index and the text.
    Output(usize, String),
}

impl JobView {
    pub fn new(job_instance_id: i64, keep_output: bool) -> Self {
        Self {
            job_instance_id,
            step_instance_id: None,
            name: None,
            status: None,
            finished: false,
            total_time_ms: None,
            hosts: Vec::new(),
            index: HashMap::new(),
            keep_output,
        }
    }

    /// `host:next_offset,...` for resuming the stream without repeats.
    pub fn offsets(&self) -> String {
        self.hosts
            .iter()
            .filter(|h| h.next_offset > 0)
            .map(|h| format!("{}:{}", h.bk_host_id, h.next_offset))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Adds or updates a host from a host event or a `step_ip_result_list` entry.
    pub fn update_host(&mut self, e: &Value) -> Change {
        let Some(id) = e["bk_host_id"].as_i64() else {
            return Change::Nothing;
        };
        let i = match self.index.get(&id) {
            Some(&i) => i,
            None => {
                self.hosts.push(HostView {
                    bk_host_id: id,
                    bk_cloud_id: 0,
                    ip: String::new(),
                    status: 0,
                    exit_code: None,
                    tag: String::new(),
                    next_offset: 0,
                    output: Captured::keeping_all(self.keep_output),
                });
                self.index.insert(id, self.hosts.len() - 1);
                self.hosts.len() - 1
            }
        };
        let host = &mut self.hosts[i];
        host.bk_cloud_id = e["bk_cloud_id"].as_i64().unwrap_or(host.bk_cloud_id);
        if let Some(ip) = e["ip"].as_str() {
            host.ip = ip.to_owned();
        }
        host.status = e["status"].as_i64().map_or(host.status, |s| s as i32);
        host.exit_code = e["exit_code"].as_i64().map(|c| c as i32);
        host.tag = e["tag"].as_str().unwrap_or("").to_owned();
        Change::Host(i)
    }

    /// Adds output to a host; text that was seen already (same offsets) is dropped.
    pub fn add_output(&mut self, bk_host_id: i64, offset: i64, next: i64, text: &str) -> Change {
        let Some(&i) = self.index.get(&bk_host_id) else {
            return Change::Nothing;
        };
        let host = &mut self.hosts[i];
        if next <= host.next_offset {
            return Change::Nothing;
        }
        let skip = (host.next_offset - offset).max(0) as usize;
        let text = text.get(skip.min(text.len())..).unwrap_or(text);
        host.next_offset = next;
        host.output.push(text);
        Change::Output(i, text.to_owned())
    }

    /// Applies one event of `stream_job`.
    pub fn apply(&mut self, event: &Value) -> Change {
        match event["type"].as_str() {
            Some("job") => {
                self.status = event["status"].as_i64().map(|s| s as i32);
                self.step_instance_id =
                    event["step_instance_id"].as_i64().or(self.step_instance_id);
                self.finished = event["finished"] == json!(true);
                Change::Job
            }
            Some("host") => self.update_host(event),
            Some("output") => {
                let (Some(host), Some(offset), Some(text)) = (
                    event["bk_host_id"].as_i64(),
                    event["offset"].as_i64(),
                    event["data"].as_str(),
                ) else {
                    return Change::Nothing;
                };
                let next = event["next_offset"]
                    .as_i64()
                    .unwrap_or(offset + text.len() as i64);
                self.add_output(host, offset, next, text)
            }
            _ => Change::Nothing,
        }
    }

    pub fn counts(&self) -> Counts {
        let mut counts = Counts::default();
        for host in &self.hosts {
            match host.outcome() {
                Outcome::Waiting => counts.waiting += 1,
                Outcome::Running => counts.running += 1,
                Outcome::Succeeded => counts.succeeded += 1,
                _ => counts.failed += 1,
            }
        }
        counts
    }

    /// Whether the job ended with every host succeeded.
    pub fn succeeded(&self) -> bool {
        self.status == Some(JobStatus::Success.code())
            && self.hosts.iter().all(|h| h.outcome() == Outcome::Succeeded)
    }

    /// The label hosts are prefixed with: the IP, or the host id when no IP is known.
    pub fn label_width(&self) -> usize {
        self.hosts
            .iter()
            .map(|h| h.label().width())
            .max()
            .unwrap_or(0)
    }

    /// The document `--output json` prints.
    pub fn to_json(&self) -> Value {
        json!({
            "job_instance_id": self.job_instance_id,
            "step_instance_id": self.step_instance_id,
            "name": self.name,
            "status": self.status,
            "status_name": self.status.map(job_status_name),
            "finished": self.finished,
            "succeeded": self.succeeded(),
            "total_time_ms": self.total_time_ms,
            "hosts": self.hosts.iter().map(|h| json!({
                "bk_host_id": h.bk_host_id,
                "bk_cloud_id": h.bk_cloud_id,
                "ip": h.ip,
                "status": h.status,
                "status_name": host_status_name(h.status),
                "outcome": h.outcome().label(),
                "exit_code": h.exit_code,
                "tag": h.tag,
                "output": h.output.full,
            })).collect::<Vec<_>>(),
        })
    }
}

impl HostView {
    pub fn outcome(&self) -> Outcome {
        Outcome::of(self.status, self.exit_code)
    }

    pub fn label(&self) -> String {
        if self.ip.is_empty() {
            format!("host {}", self.bk_host_id)
        } else {
            self.ip.clone()
        }
    }
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    pub waiting: usize,
    pub running: usize,
    pub succeeded: usize,
    pub failed: usize,
}

/// How a host's task went, in the operator's words.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Outcome {
    Succeeded,
    ExitCode(i32),
    TimedOut,
    Offline,
    Terminated,
    Failed(String),
    Waiting,
    Running,
}

impl Outcome {
    pub fn of(status: i32, exit_code: Option<i32>) -> Self {
        use HostStatus as H;
        match HostStatus::from_code(status) {
            H::Unknown | H::Waiting => Self::Waiting,
            H::Running => Self::Running,
            H::LastSuccess | H::Success => Self::Succeeded,
            H::NonZeroExit => Self::ExitCode(exit_code.unwrap_or(-1)),
            H::TaskTimeout
            | H::AgentTimeout
            | H::FileLogTimeout
            | H::ScriptTimeout
            | H::FileTimeout => Self::TimedOut,
            H::AgentError | H::AgentNotInstalled | H::AgentAbnormal => Self::Offline,
            H::ScriptTerminated | H::TerminateSuccess => Self::Terminated,
            H::ScriptFailed => match exit_code {
                Some(code) if code > 128 => {
                    Self::Failed(format!("killed by signal {}", code - 128))
                }
                _ => Self::Failed("script failed".into()),
            },
            other => Self::Failed(host_status_name(other.code()).to_owned()),
        }
    }

    pub fn label(&self) -> String {
        match self {
            Self::Succeeded => "succeeded".into(),
            Self::ExitCode(code) => format!("failed with exit code {code}"),
            Self::TimedOut => "timed out".into(),
            Self::Offline => "offline / agent abnormal".into(),
            Self::Terminated => "terminated".into(),
            Self::Failed(why) => format!("failed: {why}"),
            Self::Waiting => "waiting".into(),
            Self::Running => "running".into(),
        }
    }

    pub fn is_final(&self) -> bool {
        !matches!(self, Self::Waiting | Self::Running)
    }
}

/// A job status's name; "unknown" for a number bk-job does not define.
pub fn job_status_name(status: i32) -> &'static str {
    JobStatus::from_code(status).name().unwrap_or("unknown")
}

/// A job status from its name (`failed`, `terminate-success`) or its number.
pub fn job_status_code(text: &str) -> Option<i32> {
    JobStatus::parse(text).map(JobStatus::code)
}

pub fn job_finished(status: i32) -> bool {
    JobStatus::from_code(status).is_finished()
}

/// A host status's name; "other" for a number fleetrun does not name.
pub fn host_status_name(status: i32) -> &'static str {
    HostStatus::from_code(status).name().unwrap_or("other")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_build_the_view_and_repeats_are_dropped() {
        let mut view = JobView::new(5, true);
        view.apply(&json!({"type": "job", "status": 2, "step_instance_id": 6, "finished": false}));
        let host = json!({"type": "host", "bk_host_id": 1, "bk_cloud_id": 0, "ip": "10.0.0.1", "status": 7, "exit_code": null, "tag": ""});
        assert_eq!(view.apply(&host), Change::Host(0));
        let out = json!({"type": "output", "bk_host_id": 1, "offset": 0, "next_offset": 6, "data": "hello\n"});
        assert_eq!(view.apply(&out), Change::Output(0, "hello\n".into()));
        assert_eq!(view.apply(&out), Change::Nothing);
        view.apply(&json!({"type": "output", "bk_host_id": 1, "offset": 3, "next_offset": 9, "data": "lo\nab"}));
        assert_eq!(view.hosts[0].output.full.as_deref(), Some("hello\nab"));
        assert_eq!(view.offsets(), "1:9");
        assert_eq!(view.counts().running, 1);
        view.apply(
            &json!({"type": "host", "bk_host_id": 1, "status": 104, "exit_code": 3, "tag": ""}),
        );
        assert_eq!(view.hosts[0].outcome(), Outcome::ExitCode(3));
        assert_eq!(view.hosts[0].ip, "10.0.0.1");
        view.apply(&json!({"type": "job", "status": 4, "finished": true}));
        assert!(view.finished && !view.succeeded());
        assert_eq!(
            view.to_json()["hosts"][0]["outcome"],
            "failed with exit code 3"
        );
    }

    #[test]
    fn captured_output_keeps_identity_and_the_last_lines() {
        let mut a = Captured::default();
        let mut b = Captured::default();
        a.push("one\ntwo\n");
        b.push("one\n");
        b.push("two\n");
        assert_eq!(a.identity(), b.identity());
        for i in 0..20 {
            a.push(&format!("line {i}\n"));
        }
        a.push("partial");
        assert_eq!(a.total_lines(), 23);
        let last = a.last_lines();
        assert_eq!(last.len(), 10);
        assert_eq!(last[9], "partial");
        assert_eq!(last[0], "line 11");
    }

    #[test]
    fn statuses_read_as_outcomes() {
        assert_eq!(Outcome::of(9, Some(0)), Outcome::Succeeded);
        assert_eq!(Outcome::of(310, None).label(), "offline / agent abnormal");
        assert_eq!(Outcome::of(102, None), Outcome::TimedOut);
        assert_eq!(Outcome::of(403, None), Outcome::Terminated);
        assert_eq!(
            Outcome::of(101, Some(137)).label(),
            "failed: killed by signal 9"
        );
        assert_eq!(
            Outcome::of(311, None).label(),
            "failed: user does not exist"
        );
        assert_eq!(job_status_code("terminate-success"), Some(11));
        assert_eq!(job_status_code("FAILED"), Some(4));
        assert_eq!(job_status_code("7"), Some(7));
        assert_eq!(job_status_code("nope"), None);
    }
}
