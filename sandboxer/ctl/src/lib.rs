//! `kuasar-ctl`: what an operator asks the resident kuasar-sandboxer, over
//! its private socket (the one the shims dial, root only): the sandboxes
//! and tasks it holds, its health, and a live upgrade.

mod format;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use kuasar_core::config::{Config, DEFAULT_CONFIG};
use kuasar_protocol::{wire, Client, Code};

use format::{health_json, list_json, rfc3339};

/// Talks to the kuasar-sandboxer on this node.
#[derive(Parser)]
#[command(version)]
struct Cli {
    /// The sandboxer's private socket. Default: `listen` of --config, else
    /// $KUASAR_SANDBOXER_SOCKET, else `listen` of /etc/kuasar/sandboxer.toml
    /// (or its default, /run/kuasar/sandboxer.sock).
    #[arg(long, global = true)]
    socket: Option<PathBuf>,
    /// The sandboxer's configuration file, to find its socket.
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Every sandbox (pod) and task: kind, state, pids, address, age.
    List {
        /// One JSON document instead of tables.
        #[arg(long)]
        json: bool,
    },
    /// The daemon's pid, version, uptime, load and whether a live upgrade
    /// is possible now.
    Health {
        #[arg(long)]
        json: bool,
    },
    /// Re-executes the daemon from the binary on disk, keeping every task
    /// that can be kept; waits until the new image answers. Refused, with
    /// the reason, while something would be lost.
    Upgrade {
        /// Only say what would refuse an upgrade now (exit status 1 if
        /// something would).
        #[arg(long)]
        check: bool,
        /// How long to wait for the new image, in seconds.
        #[arg(long, default_value_t = 60)]
        wait: u64,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, thiserror::Error)]
enum Error {
    #[error("{0}")]
    Config(#[from] kuasar_core::error::Error),
    #[error("{0}")]
    Daemon(#[from] kuasar_protocol::Error),
    #[error("this kuasar-sandboxer is older than kuasar-ctl and does not answer `{0}`")]
    TooOld(&'static str),
    #[error("live upgrade refused:\n{}", .0.iter().map(|b| format!("  - {b}")).collect::<Vec<_>>().join("\n"))]
    Refused(Vec<String>),
    #[error("live upgrade failed, the daemon serves on in its old image: {0}")]
    UpgradeFailed(String),
    #[error("the daemon did not come back from the live upgrade within {0:?}")]
    NoAnswer(Duration),
}

/// How long one request may take; a live upgrade pauses the socket for up
/// to about 12 s, which [`wait_for_new_image`] covers by asking again.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

fn socket(cli: &Cli) -> Result<PathBuf, Error> {
    if let Some(s) = &cli.socket {
        return Ok(s.clone());
    }
    if let Some(c) = &cli.config {
        return Ok(Config::load(c, true)?.listen_path());
    }
    if let Some(s) = std::env::var_os(kuasar_protocol::SOCKET_ENV).filter(|v| !v.is_empty()) {
        return Ok(s.into());
    }
    Ok(Config::load(DEFAULT_CONFIG.as_ref(), false)?.listen_path())
}

/// A request the daemon did not recognise is answered "no body".
fn known(what: &'static str) -> impl Fn(kuasar_protocol::Error) -> Error {
    move |e| match &e {
        kuasar_protocol::Error::Remote { code, message }
            if *code == Code::InvalidArgument && message.starts_with("request has no body") =>
        {
            Error::TooOld(what)
        }
        _ => Error::Daemon(e),
    }
}

fn connect(path: &std::path::Path) -> Result<Client, Error> {
    Ok(Client::connect(path, CALL_TIMEOUT)?)
}

fn health(path: &std::path::Path) -> Result<wire::HealthResponse, Error> {
    connect(path)?.health().map_err(known("health"))
}

/// Writes to stdout; a reader that went away (`| head`) ends the output
/// quietly.
fn emit(text: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes()).and_then(|()| out.flush());
}

fn print_json(v: &serde_json::Value) {
    let mut text = serde_json::to_string_pretty(v).expect("a JSON value prints");
    text.push('\n');
    emit(&text);
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kuasar-ctl: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: &Cli) -> Result<(), Error> {
    let path = socket(cli)?;
    match cli.command {
        Command::List { json } => {
            let list = connect(&path)?.list().map_err(known("list"))?;
            let now = std::time::SystemTime::now();
            if json {
                print_json(&list_json(&list, now));
            } else {
                emit(&format::list_text(&list, now));
            }
            Ok(())
        }
        Command::Health { json } => {
            let h = health(&path)?;
            if json {
                print_json(&health_json(&h));
            } else {
                emit(&format::health_text(&h));
            }
            Ok(())
        }
        Command::Upgrade { check, wait, json } => {
            upgrade(&path, check, Duration::from_secs(wait), json)
        }
    }
}

fn upgrade(path: &std::path::Path, check: bool, wait: Duration, json: bool) -> Result<(), Error> {
    if check {
        let r = connect(path)?.upgrade(true).map_err(known("upgrade"))?;
        if json {
            print_json(&serde_json::json!({
                "possible": r.blockers.is_empty(),
                "blockers": r.blockers,
            }));
        }
        if !r.blockers.is_empty() {
            return Err(Error::Refused(r.blockers));
        }
        if !json {
            emit("live upgrade possible: nothing would be lost\n");
        }
        return Ok(());
    }
    // Failures are counted by the image that serves on: one more than now
    // means this upgrade came back.
    let before = health(path)?;
    let r = connect(path)?.upgrade(false).map_err(known("upgrade"))?;
    if !r.started {
        return Err(Error::Refused(r.blockers));
    }
    let asked = Instant::now();
    if !json {
        emit(&format!(
            "live upgrade started (image of {}); waiting for the new image\n",
            rfc3339(r.image_started_at_nanos)
        ));
    }
    let after = wait_for_new_image(path, &before, wait)?;
    if json {
        let mut v = health_json(&after);
        v["upgrade_took_ms"] = (asked.elapsed().as_millis() as u64).into();
        print_json(&v);
    } else {
        emit(&format!(
            "upgraded in {:.1} s: pid {}, image started {}\n{}",
            asked.elapsed().as_secs_f64(),
            after.pid,
            rfc3339(after.image_started_at_nanos),
            format::health_text(&after)
        ));
    }
    Ok(())
}

/// Asks for `health` until an image other than `before`'s answers, or the
/// old one reports the upgrade failed.
fn wait_for_new_image(
    path: &std::path::Path,
    before: &wire::HealthResponse,
    wait: Duration,
) -> Result<wire::HealthResponse, Error> {
    let deadline = Instant::now() + wait;
    loop {
        // While the daemon hands over, a connection waits in the socket's
        // backlog and a request goes unanswered: ask again.
        if let Ok(h) = health(path) {
            if h.image_started_at_nanos != before.image_started_at_nanos {
                return Ok(h);
            }
            if h.upgrades_failed > before.upgrades_failed {
                return Err(Error::UpgradeFailed(h.last_upgrade_error));
            }
        }
        if Instant::now() >= deadline {
            return Err(Error::NoAnswer(wait));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
