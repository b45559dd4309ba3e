//! The runc command line, run through the daemon's one spawn helper.

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::reaper::Reaper;
use crate::spawn;

pub struct RuncCli {
    pub binary: String,
    /// Per-namespace runc roots live below this.
    pub root: PathBuf,
    pub reaper: Arc<Reaper>,
}

/// Stdio handed to runc, and through it to the container process.
pub struct RuncStdio {
    pub stdin: OwnedFd,
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
}

impl RuncCli {
    pub fn root_for(&self, namespace: &str) -> PathBuf {
        self.root.join(namespace)
    }

    fn command(&self, namespace: &str) -> Command {
        let mut cmd = Command::new(&self.binary);
        cmd.arg("--root").arg(self.root_for(namespace));
        cmd.stdin(Stdio::null());
        cmd
    }

    /// Runs a runc subcommand and returns its stdout; a failure carries
    /// runc's own message.
    pub async fn run(&self, namespace: &str, args: &[&str]) -> Result<Vec<u8>> {
        let mut cmd = self.command(namespace);
        cmd.args(args);
        let started = std::time::Instant::now();
        let out = spawn::run(&self.reaper, cmd, true).await?;
        log_run(args.first().copied(), started, out.status);
        if out.status != 0 {
            return Err(runc_error(args, &message_from_stderr(&out.stderr)));
        }
        Ok(out.stdout)
    }

    /// Runs `create` or `exec`, whose stdio becomes the process's; runc's
    /// own errors go to the JSON `log` file instead.
    pub async fn run_with_stdio(
        &self,
        namespace: &str,
        args: &[String],
        stdio: RuncStdio,
        log: &Path,
    ) -> Result<()> {
        let _ = std::fs::remove_file(log);
        let mut cmd = self.command(namespace);
        cmd.arg("--log").arg(log).arg("--log-format").arg("json");
        cmd.args(args);
        cmd.stdin(Stdio::from(stdio.stdin))
            .stdout(Stdio::from(stdio.stdout))
            .stderr(Stdio::from(stdio.stderr));
        let started = std::time::Instant::now();
        let out = spawn::run(&self.reaper, cmd, false).await?;
        log_run(args.first().map(String::as_str), started, out.status);
        if out.status != 0 {
            let log_text = std::fs::read(log).unwrap_or_default();
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            return Err(runc_error(&args, &message_from_log(&log_text)));
        }
        Ok(())
    }
}

/// One line per runc command, with how long it took: runc create and
/// exec are most of a container's start.
fn log_run(subcommand: Option<&str>, started: std::time::Instant, status: u32) {
    tracing::debug!(
        subcommand = subcommand.unwrap_or_default(),
        status,
        took_us = started.elapsed().as_micros() as u64,
        "runc"
    );
}

fn runc_error(args: &[&str], message: &str) -> Error {
    let command = format!("runc {}", args.first().copied().unwrap_or_default());
    let lower = message.to_ascii_lowercase();
    if lower.contains("does not exist")
        || lower.contains("not running")
        || lower.contains("already finished")
    {
        return Error::NotFound(format!("{command}: {message}"));
    }
    Error::Runtime {
        command,
        message: message.to_string(),
    }
}

/// runc's last error from its logrus text output (`level=error msg="…"`).
pub fn message_from_stderr(stderr: &[u8]) -> String {
    let text = String::from_utf8_lossy(stderr);
    let line = text
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .trim();
    match line.find("msg=\"") {
        Some(start) => {
            let rest = &line[start + 5..];
            let end = rest.rfind('"').unwrap_or(rest.len());
            rest[..end].replace("\\\"", "\"")
        }
        None if line.is_empty() => "failed without a message".into(),
        None => line.to_string(),
    }
}

/// runc's last error from its JSON log.
pub fn message_from_log(log: &[u8]) -> String {
    #[derive(serde::Deserialize)]
    struct Entry {
        #[serde(default)]
        level: String,
        #[serde(default)]
        msg: String,
    }
    String::from_utf8_lossy(log)
        .lines()
        .rev()
        .filter_map(|l| serde_json::from_str::<Entry>(l).ok())
        .find(|e| e.level == "error" || e.level == "fatal")
        .map(|e| e.msg)
        .unwrap_or_else(|| "failed without a message".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_taken_from_runc_output() {
        assert_eq!(
            message_from_stderr(
                b"time=\"2026\" level=error msg=\"container \\\"x\\\" does not exist\"\n"
            ),
            "container \"x\" does not exist"
        );
        assert_eq!(message_from_stderr(b"plain failure\n\n"), "plain failure");
        let log = br#"{"level":"info","msg":"x"}
{"level":"error","msg":"runc create failed: unable to start container process: exec: \"nope\": executable file not found in $PATH"}
"#;
        assert!(message_from_log(log).contains("executable file not found"));
    }

    #[test]
    fn missing_and_finished_containers_map_to_not_found() {
        let e = runc_error(&["kill"], "container not running");
        assert!(matches!(e, Error::NotFound(_)), "{e:?}");
        let e = runc_error(&["start"], "cannot start a container that has stopped");
        assert!(matches!(e, Error::Runtime { .. }), "{e:?}");
    }
}
