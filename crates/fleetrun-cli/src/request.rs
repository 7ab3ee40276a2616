//! `fleetrun run`'s flags as a `fast_execute_script` request.

use std::path::Path;

use base64::Engine as _;
use serde_json::{Value, json};

use crate::{
    args::{Lang, RunArgs},
    error::CliError,
};

/// An `--ip` target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpTarget {
    pub bk_cloud_id: i64,
    pub ip: String,
}

/// `[CLOUD:]IP`; an IPv6 address may stand alone or after `CLOUD:`.
pub fn parse_ip(text: &str) -> Result<IpTarget, CliError> {
    let text = text.trim();
    let bad = || {
        CliError::usage(format!(
            "--ip {text:?} is not [CLOUD:]IP, e.g. 10.0.0.5 or 1:10.0.0.5"
        ))
    };
    if let Ok(ip) = text.parse::<std::net::IpAddr>() {
        return Ok(IpTarget {
            bk_cloud_id: 0,
            ip: ip.to_string(),
        });
    }
    let (cloud, ip) = text.split_once(':').ok_or_else(bad)?;
    let bk_cloud_id = cloud.parse().map_err(|_| bad())?;
    let ip: std::net::IpAddr = ip.parse().map_err(|_| bad())?;
    Ok(IpTarget {
        bk_cloud_id,
        ip: ip.to_string(),
    })
}

/// `TYPE:ID` as a `topo_node_list` entry.
pub fn parse_topo(text: &str) -> Result<Value, CliError> {
    let bad = || CliError::usage(format!("--topo {text:?} is not TYPE:ID, e.g. module:12"));
    let (kind, id) = text.split_once(':').ok_or_else(bad)?;
    let id: i64 = id.trim().parse().map_err(|_| bad())?;
    if kind.trim().is_empty() {
        return Err(bad());
    }
    Ok(json!({"node_type": kind.trim(), "id": id}))
}

/// The language of a script file: its extension, else its `#!` line.
pub fn language_of(path: &Path, content: &[u8]) -> Option<Lang> {
    let by_extension = path.extension().and_then(|e| e.to_str()).and_then(|e| {
        match e.to_ascii_lowercase().as_str() {
            "sh" | "bash" => Some(Lang::Shell),
            "bat" | "cmd" => Some(Lang::Bat),
            "pl" => Some(Lang::Perl),
            "py" => Some(Lang::Python),
            "ps1" => Some(Lang::Powershell),
            _ => None,
        }
    });
    by_extension.or_else(|| {
        let first = content.split(|b| *b == b'\n').next()?;
        let shebang = std::str::from_utf8(first).ok()?.strip_prefix("#!")?;
        let mut words = shebang.split_whitespace();
        let mut program = words.next()?.rsplit('/').next()?;
        if program == "env" {
            program = words.find(|w| !w.starts_with('-'))?;
        }
        match program.trim_end_matches(|c: char| c.is_ascii_digit() || c == '.') {
            "sh" | "bash" | "dash" | "ksh" | "zsh" => Some(Lang::Shell),
            "python" => Some(Lang::Python),
            "perl" => Some(Lang::Perl),
            "pwsh" | "powershell" => Some(Lang::Powershell),
            _ => None,
        }
    })
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// The script part of the request: content and language, or a library script.
pub fn script_fields(
    run: &RunArgs,
    read: &dyn Fn(&Path) -> std::io::Result<Vec<u8>>,
) -> Result<Value, CliError> {
    let mut fields = json!({});
    if let Some(command) = &run.command {
        fields["script_content"] = json!(b64(command.as_bytes()));
        fields["script_language"] = json!(run.lang.unwrap_or(Lang::Shell).code());
    } else if let Some(path) = &run.script {
        let content = read(path)
            .map_err(|e| CliError::usage(format!("cannot read {}: {e}", path.display())))?;
        let lang = run
            .lang
            .or_else(|| language_of(path, &content))
            .ok_or_else(|| {
                CliError::usage(format!(
                    "cannot tell the language of {} from its name or #! line: pass --lang",
                    path.display()
                ))
            })?;
        fields["script_content"] = json!(b64(&content));
        fields["script_language"] = json!(lang.code());
    } else {
        if let Some(id) = &run.script_id {
            fields["script_id"] = json!(id);
        }
        if let Some(version) = run.script_version {
            fields["script_version_id"] = json!(version);
        }
        if let Some(lang) = run.lang {
            fields["script_language"] = json!(lang.code());
        }
    }
    Ok(fields)
}

/// The whole request, but for the scope; `host_ids` are the hosts to send as `host_id_list`
/// (the `--host` ids, plus the `--ip` hosts when both were given, since bk-job ignores
/// `ip_list` next to `host_id_list`).
pub fn build(
    run: &RunArgs,
    host_ids: &[i64],
    ips: &[IpTarget],
    read: &dyn Fn(&Path) -> std::io::Result<Vec<u8>>,
) -> Result<Value, CliError> {
    let mut request = script_fields(run, read)?;
    match run.account.parse::<i64>() {
        Ok(id) => request["account_id"] = json!(id),
        Err(_) => request["account_alias"] = json!(run.account),
    }
    if let Some(timeout) = run.timeout {
        request["timeout"] = json!(timeout);
    }
    if let Some(param) = &run.param {
        request["script_param"] = json!(b64(param.as_bytes()));
        request["is_param_sensitive"] = json!(i32::from(run.sensitive));
    }
    if let Some(name) = &run.name {
        request["task_name"] = json!(name);
    }
    if let Some(url) = &run.callback {
        request["callback_url"] = json!(url);
    }
    let mut target = json!({});
    if !host_ids.is_empty() {
        target["host_id_list"] = json!(host_ids);
    } else if !ips.is_empty() {
        target["ip_list"] = ips
            .iter()
            .map(|t| json!({"bk_cloud_id": t.bk_cloud_id, "ip": t.ip}))
            .collect();
    }
    if !run.topo.is_empty() {
        target["topo_node_list"] = run
            .topo
            .iter()
            .map(|t| parse_topo(t))
            .collect::<Result<Vec<_>, _>>()?
            .into();
    }
    if !run.groups.is_empty() {
        target["dynamic_group_list"] = run.groups.iter().map(|g| json!({"id": g})).collect();
    }
    request["target_server"] = target;
    if let Some(expression) = &run.batch {
        let mut rolling = json!({"expression": expression, "mode": run.on_failure.mode()});
        if let Some(n) = run.max_failures {
            rolling["max_failures"] = json!(n);
        }
        request["rolling_config"] = rolling;
    }
    Ok(request)
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::args::{Cli, Command};

    fn run_args(args: &[&str]) -> RunArgs {
        let mut all = vec!["fleetrun", "run"];
        all.extend_from_slice(args);
        match Cli::try_parse_from(all).unwrap().command {
            Command::Run(run) => *run,
            _ => unreachable!(),
        }
    }

    fn no_files(_: &Path) -> std::io::Result<Vec<u8>> {
        Err(std::io::Error::from(std::io::ErrorKind::NotFound))
    }

    #[test]
    fn ips_take_an_optional_cloud_area() {
        assert_eq!(
            parse_ip("10.0.0.5").unwrap(),
            IpTarget {
                bk_cloud_id: 0,
                ip: "10.0.0.5".into()
            }
        );
        assert_eq!(parse_ip("3:10.0.0.5").unwrap().bk_cloud_id, 3);
        assert_eq!(parse_ip("::1").unwrap().ip, "::1");
        assert_eq!(
            parse_ip("2:::1").unwrap(),
            IpTarget {
                bk_cloud_id: 2,
                ip: "::1".into()
            }
        );
        assert!(parse_ip("host.example").is_err());
        assert!(parse_ip("x:10.0.0.1").is_err());
    }

    #[test]
    fn a_command_becomes_a_shell_script_with_every_option() {
        let run = run_args(&[
            "--host",
            "1",
            "--topo",
            "module:12",
            "--group",
            "g1",
            "-c",
            "echo hi",
            "--as",
            "7",
            "--timeout",
            "30",
            "--param",
            "a 'b c'",
            "--sensitive",
            "--name",
            "n",
            "--callback",
            "http://cb/",
        ]);
        let r = build(&run, &[1], &[], &no_files).unwrap();
        assert_eq!(r["script_content"], b64(b"echo hi"));
        assert_eq!(r["script_language"], 1);
        assert_eq!(r["account_id"], 7);
        assert_eq!(r["timeout"], 30);
        assert_eq!(r["script_param"], b64(b"a 'b c'"));
        assert_eq!(r["is_param_sensitive"], 1);
        assert_eq!(r["task_name"], "n");
        assert_eq!(r["callback_url"], "http://cb/");
        assert_eq!(
            r["target_server"],
            json!({"host_id_list": [1], "topo_node_list": [{"node_type": "module", "id": 12}],
                   "dynamic_group_list": [{"id": "g1"}]})
        );
        let run = run_args(&["--ip", "10.0.0.1", "-c", "x", "--as", "deploy"]);
        let ips = [parse_ip("10.0.0.1").unwrap()];
        let r = build(&run, &[], &ips, &no_files).unwrap();
        assert_eq!(r["account_alias"], "deploy");
        assert_eq!(
            r["target_server"],
            json!({"ip_list": [{"bk_cloud_id": 0, "ip": "10.0.0.1"}]})
        );
    }

    #[test]
    fn a_script_file_names_its_language() {
        let read = |_: &Path| Ok(b"print('hi')\n".to_vec());
        let run = run_args(&["--host", "1", "--script", "job.py"]);
        assert_eq!(build(&run, &[1], &[], &read).unwrap()["script_language"], 4);
        let run = run_args(&["--host", "1", "--script", "job", "--lang", "perl"]);
        assert_eq!(build(&run, &[1], &[], &read).unwrap()["script_language"], 3);
        let run = run_args(&["--host", "1", "--script", "job"]);
        assert_eq!(build(&run, &[1], &[], &read).unwrap_err().exit_code(), 2);
        let run = run_args(&["--host", "1", "--script", "missing.sh"]);
        assert!(
            build(&run, &[1], &[], &no_files)
                .unwrap_err()
                .to_string()
                .contains("missing.sh")
        );
        let shebang = |_: &Path| Ok(b"#!/usr/bin/env -S python3 -u\n".to_vec());
        let run = run_args(&["--host", "1", "--script", "tool"]);
        assert_eq!(
            build(&run, &[1], &[], &shebang).unwrap()["script_language"],
            4
        );
        for (name, lang) in [
            ("a.sh", 1),
            ("a.bash", 1),
            ("a.bat", 2),
            ("a.CMD", 2),
            ("a.pl", 3),
            ("a.ps1", 5),
        ] {
            assert_eq!(
                language_of(Path::new(name), b"").map(Lang::code),
                Some(lang),
                "{name}"
            );
        }
        assert_eq!(
            language_of(Path::new("x"), b"#!/bin/bash -e\n"),
            Some(Lang::Shell)
        );
    }

    #[test]
    fn library_scripts_pass_their_ids() {
        let run = run_args(&["--host", "1", "--script-id", "12", "--script-version", "3"]);
        let r = build(&run, &[1], &[], &no_files).unwrap();
        assert_eq!(r["script_id"], "12");
        assert_eq!(r["script_version_id"], 3);
        assert!(r.get("script_content").is_none());
    }
}
