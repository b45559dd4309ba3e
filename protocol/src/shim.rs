//! What every `containerd-shim-kuasar*-v1` binary does. A shim lives for
//! about a millisecond: `start` asks the sandboxer for the task address,
//! writes `<bundle>/address` and prints it; `delete` asks the sandboxer to
//! drop the task (or cleans up itself when the sandboxer is down) and prints
//! a `DeleteResponse`. Nothing else may reach stdout or stderr: containerd
//! reads both, merged, as the address.

use std::collections::HashMap;
use std::io::{self, IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use containerd_shim_protos::api::DeleteResponse;
use containerd_shim_protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim_protos::types::introspection::{RuntimeInfo, RuntimeVersion};

use crate::cli::{Action, Args};
use crate::error::{Code, Error};
use crate::wire;
use crate::{Client, Kind};

/// Annotations that put a container into an existing sandbox, in the order
/// containerd-shim-runc-v2 consults them.
pub const GROUP_ANNOTATIONS: [&str; 2] = [
    "io.containerd.runc.v2.group",
    "io.kubernetes.cri.sandbox-id",
];

/// Exit status reported for a task that had to be killed (128 + SIGKILL).
const KILLED: u32 = 137;

const RESOLVE_TIMEOUT: Duration = Duration::from_secs(10);
/// containerd kills `shim delete` after 5 s; leave room for the fallback.
const DELETE_TIMEOUT: Duration = Duration::from_secs(3);

/// Runs the shim for `kind` with the process's arguments; the whole `main`
/// of each shim binary.
pub fn main(kind: Kind) -> ExitCode {
    let args = match Args::parse(std::env::args().skip(1)) {
        Ok(a) => a,
        Err(e) => return fail(kind, &e),
    };
    let result = if args.version {
        print_version(kind)
    } else if args.info {
        print_info(kind)
    } else {
        match args.action {
            Some(Action::Start) => start(kind, &args),
            Some(Action::Delete) => delete(kind, &args),
            None => Err(ShimError::Usage(
                "missing action: expected start or delete".into(),
            )),
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(kind, &e),
    }
}

fn fail(kind: Kind, e: &dyn std::fmt::Display) -> ExitCode {
    // One line: containerd shows it verbatim in the error it returns.
    let _ = writeln!(io::stderr(), "{}: {e}", kind.shim_binary());
    ExitCode::FAILURE
}

#[derive(Debug, thiserror::Error)]
enum ShimError {
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Protocol(#[from] Error),
    #[error("{what}: {source}")]
    Io { what: String, source: io::Error },
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> ShimError {
    let what = what.into();
    move |source| ShimError::Io { what, source }
}

fn bundle_dir(args: &Args) -> Result<PathBuf, ShimError> {
    if !args.bundle.is_empty() {
        return Ok(PathBuf::from(&args.bundle));
    }
    // containerd runs the shim with the bundle as its working directory.
    std::env::current_dir().map_err(io_err("finding the bundle (working directory)"))
}

fn namespace(args: &Args) -> Result<String, ShimError> {
    let ns = if args.namespace.is_empty() {
        std::env::var("NAMESPACE").unwrap_or_default()
    } else {
        args.namespace.clone()
    };
    if ns.is_empty() {
        return Err(ShimError::Usage("missing -namespace".into()));
    }
    Ok(ns)
}

fn required_id(args: &Args) -> Result<String, ShimError> {
    if args.id.is_empty() {
        return Err(ShimError::Usage("missing -id".into()));
    }
    Ok(args.id.clone())
}

/// The sandbox a container belongs to, from its OCI annotations. A bundle
/// without `config.json` (a containerd 2.x sandbox bundle) is its own sandbox.
fn group_of(bundle: &Path) -> Result<String, ShimError> {
    #[derive(serde::Deserialize)]
    struct Spec {
        #[serde(default)]
        annotations: Option<HashMap<String, String>>,
    }
    let path = bundle.join("config.json");
    let data = match std::fs::read(&path) {
        Ok(d) => d,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(String::new()),
        Err(e) => return Err(io_err(format!("reading {}", path.display()))(e)),
    };
    let spec: Spec = serde_json::from_slice(&data).map_err(|e| ShimError::Io {
        what: format!("parsing {}", path.display()),
        source: io::Error::new(io::ErrorKind::InvalidData, e),
    })?;
    let annotations = spec.annotations.unwrap_or_default();
    Ok(GROUP_ANNOTATIONS
        .iter()
        .find_map(|k| annotations.get(*k).filter(|v| !v.is_empty()).cloned())
        .unwrap_or_default())
}

fn socket_path(args: &Args) -> PathBuf {
    if args.socket.is_empty() {
        crate::socket_path()
    } else {
        PathBuf::from(&args.socket)
    }
}

fn start(kind: Kind, args: &Args) -> Result<(), ShimError> {
    let namespace = namespace(args)?;
    let id = required_id(args)?;
    let bundle = bundle_dir(args)?;
    let group = group_of(&bundle)?;
    drain_stdin();
    let grpc_address = if args.address.is_empty() {
        std::env::var("GRPC_ADDRESS").unwrap_or_default()
    } else {
        args.address.clone()
    };
    let req = wire::ResolveRequest {
        kind: kind.as_str().into(),
        namespace,
        id,
        bundle: bundle.to_string_lossy().into_owned(),
        group,
        ttrpc_address: std::env::var("TTRPC_ADDRESS").unwrap_or_default(),
        grpc_address,
        publish_binary: args.publish_binary.clone(),
        debug: args.debug,
    };
    let address = Client::connect(&socket_path(args), RESOLVE_TIMEOUT)?.resolve(req)?;
    // containerd 1.6 reconnects after its own restart from this file alone.
    write_atomic(&bundle.join("address"), address.as_bytes())
        .map_err(io_err("writing the bundle's address file"))?;
    io::stdout()
        .write_all(address.as_bytes())
        .map_err(io_err("printing the address"))?;
    Ok(())
}

/// containerd writes the runtime options to stdin; the address lookup does
/// not need them, but reading them lets containerd finish its write cleanly.
fn drain_stdin() {
    let stdin = io::stdin();
    if stdin.is_terminal() {
        return;
    }
    let _ = stdin.lock().take(1 << 20).read_to_end(&mut Vec::new());
}

fn delete(kind: Kind, args: &Args) -> Result<(), ShimError> {
    let namespace = namespace(args)?;
    let id = required_id(args)?;
    let bundle = bundle_dir(args)?;
    let req = wire::DeleteRequest {
        kind: kind.as_str().into(),
        namespace,
        id: id.clone(),
        bundle: bundle.to_string_lossy().into_owned(),
    };
    let reply =
        match Client::connect(&socket_path(args), DELETE_TIMEOUT).and_then(|mut c| c.delete(req)) {
            Ok(r) => r,
            Err(e) if e.code() == Code::Unavailable => cleanup_without_sandboxer(&bundle, &id),
            Err(e) => return Err(e.into()),
        };
    let mut resp = DeleteResponse::new();
    resp.pid = reply.pid;
    resp.exit_status = reply.exit_status;
    let mut ts = Timestamp::new();
    ts.seconds = reply.exited_at_nanos.div_euclid(1_000_000_000);
    ts.nanos = reply.exited_at_nanos.rem_euclid(1_000_000_000) as i32;
    resp.exited_at = Some(ts).into();
    print_message(&resp, "the delete response")
}

/// Writes a protobuf message, and nothing else, to stdout.
fn print_message(
    msg: &dyn containerd_shim_protos::protobuf::MessageDyn,
    what: &str,
) -> Result<(), ShimError> {
    let bytes = msg.write_to_bytes_dyn().map_err(|e| ShimError::Io {
        what: format!("encoding {what}"),
        source: io::Error::other(e),
    })?;
    io::stdout()
        .write_all(&bytes)
        .map_err(io_err(format!("printing {what}")))
}

/// What the sandboxer records in a bundle so that `delete` works without it.
#[derive(serde::Serialize, serde::Deserialize, Debug, Default, Clone, PartialEq)]
pub struct BundleRuntime {
    pub runc_binary: String,
    pub runc_root: String,
}

/// The sandboxer is down: force-remove this one container with runc and
/// unmount its rootfs, as containerd-shim-runc-v2 does, and report a kill.
fn cleanup_without_sandboxer(bundle: &Path, id: &str) -> wire::DeleteResponse {
    let runtime: Option<BundleRuntime> = std::fs::read(bundle.join(crate::BUNDLE_RUNTIME_FILE))
        .ok()
        .and_then(|d| serde_json::from_slice(&d).ok());
    if let Some(rt) = runtime {
        let _ = Command::new(&rt.runc_binary)
            .args(["--root", &rt.runc_root, "delete", "--force", id])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
    let rootfs = bundle.join("rootfs");
    if let Ok(c) = std::ffi::CString::new(rootfs.as_os_str().as_encoded_bytes()) {
        // SAFETY: c is a valid NUL-terminated path.
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    }
    wire::DeleteResponse {
        pid: 0,
        exit_status: KILLED,
        exited_at_nanos: now_nanos(),
    }
}

pub fn now_nanos() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(1)
}

/// Writes `data` to `path` through a temporary file and a rename, so readers
/// see the old content or the new, never a torn one.
pub fn write_atomic(path: &Path, data: &[u8]) -> io::Result<()> {
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    // Unique per write: concurrent writers of one path must not share it.
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    tmp_name.push(format!(".{}.{seq}.tmp", std::process::id()));
    let tmp = path.with_file_name(tmp_name);
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

fn print_version(kind: Kind) -> Result<(), ShimError> {
    let text = format!(
        "{}:\n  Version: {}\n  Runtime: {}\n",
        kind.shim_binary(),
        env!("CARGO_PKG_VERSION"),
        kind.runtime_type()
    );
    io::stdout()
        .write_all(text.as_bytes())
        .map_err(io_err("printing the version"))
}

/// `-info` (containerd 2.x): a `RuntimeInfo` protobuf on stdout.
fn print_info(kind: Kind) -> Result<(), ShimError> {
    drain_stdin();
    let mut info = RuntimeInfo::new();
    info.name = kind.runtime_type().into();
    let mut v = RuntimeVersion::new();
    v.version = env!("CARGO_PKG_VERSION").into();
    info.version = Some(v).into();
    if kind != Kind::Vmm {
        // Pods of these kinds run their Linux containers with runc: containerd
        // 2.x offers them what runc can do (recursive read-only mounts, ...).
        info.features = runc_features().into();
    }
    print_message(&info, "runtime info")
}

/// The type containerd registers for the OCI runtime features document.
const FEATURES_TYPE: &str = "types.containerd.io/opencontainers/runtime-spec/1/features/Features";

/// `runc features` as containerd-shim-runc-v2 reports it: the JSON document
/// in an Any. `None` if runc cannot tell (as that shim, not an error).
fn runc_features() -> Option<protobuf::well_known_types::any::Any> {
    let runc = std::env::var("KUASAR_RUNC_BINARY").unwrap_or_else(|_| "runc".into());
    let out = std::process::Command::new(runc)
        .arg("features")
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .output()
        .ok()?;
    if !out.status.success() || serde_json::from_slice::<serde_json::Value>(&out.stdout).is_err() {
        return None;
    }
    let mut any = protobuf::well_known_types::any::Any::new();
    any.type_url = FEATURES_TYPE.into();
    any.value = out.stdout;
    Some(any)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_prefers_runc_group_then_cri_sandbox_id() {
        let dir = tempdir();
        std::fs::write(
            dir.join("config.json"),
            r#"{"ociVersion":"1.0.2","annotations":{"io.kubernetes.cri.sandbox-id":"pod1","io.containerd.runc.v2.group":"g"}}"#,
        )
        .unwrap();
        assert_eq!(group_of(&dir).unwrap(), "g");
        std::fs::write(
            dir.join("config.json"),
            r#"{"annotations":{"io.kubernetes.cri.sandbox-id":"pod1"}}"#,
        )
        .unwrap();
        assert_eq!(group_of(&dir).unwrap(), "pod1");
        std::fs::write(dir.join("config.json"), r#"{"process":{}}"#).unwrap();
        assert_eq!(group_of(&dir).unwrap(), "");
        std::fs::remove_file(dir.join("config.json")).unwrap();
        assert_eq!(
            group_of(&dir).unwrap(),
            "",
            "2.x sandbox bundles have no config.json"
        );
        std::fs::write(dir.join("config.json"), "{not json").unwrap();
        assert!(group_of(&dir).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn write_atomic_replaces_content_and_leaves_no_temp_file() {
        let dir = tempdir();
        let p = dir.join("address");
        write_atomic(&p, b"unix:///a").unwrap();
        write_atomic(&p, b"unix:///b").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"unix:///b");
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn tempdir() -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "kuasar-protocol-test-{}-{}",
            std::process::id(),
            now_nanos()
        ));
        std::fs::create_dir_all(&d).unwrap();
        d
    }
}
