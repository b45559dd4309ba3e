//! What a wasm container is, read from its bundle's OCI spec: the program
//! (`process.args[0]` in the rootfs, `path#function` picks an export other
//! than `_start`), its arguments, environment and working directory, the
//! directories it may see, its memory limit and its network access.

use std::ffi::CString;
use std::io::Read;
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use oci_spec::runtime::Spec;

use kuasar_core::error::{io_context, Error, Result};

/// Annotation asking for network access (`tcp`, `udp`, `tcp,udp`, `none`);
/// sockets are denied without it.
pub const NETWORK_ANNOTATION: &str = "io.kuasar.wasm.network";

/// The socket kinds an instance may use.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Network {
    pub tcp: bool,
    pub udp: bool,
}

impl Network {
    pub fn any(&self) -> bool {
        self.tcp || self.udp
    }

    fn parse(value: &str) -> Result<Network> {
        let mut n = Network::default();
        for word in value.split(',').map(str::trim) {
            match word {
                "" | "none" => {}
                "tcp" => n.tcp = true,
                "udp" => n.udp = true,
                _ => {
                    return Err(invalid(format!(
                        "{NETWORK_ANNOTATION}={value}: expected none, tcp, udp or tcp,udp"
                    )))
                }
            }
        }
        Ok(n)
    }
}

/// The network namespace an instance's sockets live in, from the spec's
/// `linux.namespaces`, as runc would place a process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetNs {
    /// No network namespace named: the daemon's own (the host's).
    Host,
    /// The pod's, by path.
    Path(PathBuf),
    /// A namespace without a path: a new one of the instance's own.
    New,
}

/// A directory the instance sees.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Preopen {
    pub host: PathBuf,
    pub guest: String,
    pub readonly: bool,
}

#[derive(Debug)]
pub struct InstanceSpec {
    /// `process.args`, with the `#function` suffix taken off the first.
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub cwd: String,
    /// The core module export to call (components run `wasi:cli/run`).
    pub function: String,
    /// Where the program was found, inside the rootfs (or, not found there,
    /// the name asked for).
    pub program_path: String,
    pub preopens: Vec<Preopen>,
    /// Bytes; 0 means none.
    pub memory_limit: u64,
    pub network: Network,
    pub netns: NetNs,
}

fn invalid(msg: impl Into<String>) -> Error {
    Error::InvalidArgument(msg.into())
}

/// Reads the bundle's spec and the program it names; `None` when the
/// rootfs has no such file.
pub fn load(bundle: &Path) -> Result<(InstanceSpec, Option<Vec<u8>>)> {
    let path = bundle.join("config.json");
    let text = std::fs::read(&path).map_err(io_context(format!("reading {}", path.display())))?;
    let spec: Spec =
        serde_json::from_slice(&text).map_err(|e| invalid(format!("{}: {e}", path.display())))?;
    let process = spec
        .process()
        .as_ref()
        .ok_or_else(|| invalid("the spec has no process"))?;
    let mut args = process.args().clone().unwrap_or_default();
    let first = args
        .first()
        .cloned()
        .ok_or_else(|| invalid("process.args is empty: it must name the wasm program"))?;
    let (program, function) = match first.split_once('#') {
        Some((p, f)) if !f.is_empty() => (p.to_string(), f.to_string()),
        _ => (first.clone(), "_start".to_string()),
    };
    args[0] = program.clone();
    let env: Vec<(String, String)> = process
        .env()
        .iter()
        .flatten()
        .map(|kv| match kv.split_once('=') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None => (kv.clone(), String::new()),
        })
        .collect();
    let cwd = process.cwd().display().to_string();

    let root = spec
        .root()
        .as_ref()
        .ok_or_else(|| invalid("the spec has no root"))?;
    let rootfs = if root.path().is_absolute() {
        root.path().clone()
    } else {
        bundle.join(root.path())
    };
    let mut preopens = vec![Preopen {
        host: rootfs.clone(),
        guest: "/".into(),
        readonly: root.readonly().unwrap_or(false),
    }];
    for m in spec.mounts().iter().flatten() {
        let options = m.options().clone().unwrap_or_default();
        let is_bind = m.typ().as_deref() == Some("bind")
            || options.iter().any(|o| o == "bind" || o == "rbind");
        // Kernel filesystems (proc, sysfs, devpts...) mean nothing to a
        // wasm program and would show it the host; files cannot be
        // preopened.
        let Some(source) = m.source() else { continue };
        if !is_bind || !source.is_dir() {
            continue;
        }
        preopens.push(Preopen {
            host: source.clone(),
            guest: m.destination().display().to_string(),
            readonly: options.iter().any(|o| o == "ro"),
        });
    }

    let network = match spec
        .annotations()
        .as_ref()
        .and_then(|a| a.get(NETWORK_ANNOTATION))
    {
        Some(v) => Network::parse(v)?,
        None => Network::default(),
    };
    let netns = spec
        .linux()
        .as_ref()
        .and_then(|l| l.namespaces().as_ref())
        .and_then(|ns| {
            ns.iter()
                .find(|n| n.typ() == oci_spec::runtime::LinuxNamespaceType::Network)
        })
        .map_or(NetNs::Host, |n| match n.path() {
            Some(p) if !p.as_os_str().is_empty() => NetNs::Path(p.clone()),
            _ => NetNs::New,
        });

    let memory_limit = spec
        .linux()
        .as_ref()
        .and_then(|l| l.resources().as_ref())
        .and_then(|r| r.memory().as_ref())
        .and_then(|m| m.limit())
        .filter(|l| *l > 0)
        .unwrap_or(0) as u64;

    let search_path = env
        .iter()
        .find(|(k, _)| k == "PATH")
        .map(|(_, v)| v.as_str())
        .unwrap_or("/usr/local/bin:/usr/bin:/bin");
    let (program_path, bytes) = match read_program(&rootfs, &program, &cwd, search_path) {
        Ok((path, bytes)) => (path, Some(bytes)),
        Err(Error::NotFound(_)) => (program, None),
        Err(e) => return Err(e),
    };
    Ok((
        InstanceSpec {
            args,
            env,
            cwd,
            function,
            program_path,
            preopens,
            memory_limit,
            network,
            netns,
        },
        bytes,
    ))
}

/// Where to look for `program`, in order, as guest paths.
fn candidates(program: &str, cwd: &str, search_path: &str) -> Vec<String> {
    let join = |dir: &str, p: &str| format!("{}/{}", dir.trim_end_matches('/'), p);
    if program.starts_with('/') {
        vec![program.to_string()]
    } else if program.contains('/') {
        vec![join(cwd, program)]
    } else {
        search_path
            .split(':')
            .filter(|d| !d.is_empty())
            .map(|d| join(d, program))
            .chain([join(cwd, program)])
            .collect()
    }
}

fn read_program(
    rootfs: &Path,
    program: &str,
    cwd: &str,
    search_path: &str,
) -> Result<(String, Vec<u8>)> {
    let root = std::fs::File::open(rootfs)
        .map_err(io_context(format!("opening rootfs {}", rootfs.display())))?;
    for guest in candidates(program, cwd, search_path) {
        match open_in_root(&root, &guest) {
            Ok(mut f) => {
                let mut bytes = Vec::new();
                f.read_to_end(&mut bytes)
                    .map_err(io_context(format!("reading {guest} in the rootfs")))?;
                return Ok((guest, bytes));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io_context(format!("opening {guest} in the rootfs"))(e)),
        }
    }
    Err(Error::NotFound(format!(
        "wasm program {program:?} not found in the container's rootfs"
    )))
}

/// Opens `path` as if the rootfs were `/`: symlinks and `..` cannot leave it.
fn open_in_root(root: &std::fs::File, path: &str) -> std::io::Result<std::fs::File> {
    use std::os::fd::AsRawFd;
    let c = CString::new(path.trim_start_matches('/'))
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    // SAFETY: open_how is plain integers; all zero is its default.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (libc::O_RDONLY | libc::O_CLOEXEC) as u64;
    how.resolve = libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS;
    // SAFETY: openat2 reads the path and the open_how we pass by pointer
    // with its size; it returns a new descriptor or -1.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            root.as_raw_fd(),
            c.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor we now own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let f = std::fs::File::from(fd);
    if !f.metadata()?.is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    Ok(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn program_lookup_order() {
        assert_eq!(candidates("/app/x.wasm", "/w", "/bin"), vec!["/app/x.wasm"]);
        assert_eq!(
            candidates("sub/x.wasm", "/w/", "/bin"),
            vec!["/w/sub/x.wasm"]
        );
        assert_eq!(
            candidates("x.wasm", "/", "/usr/bin:/bin"),
            vec!["/usr/bin/x.wasm", "/bin/x.wasm", "/x.wasm"]
        );
    }

    #[test]
    fn reads_stay_inside_the_rootfs() {
        let dir = tempfile::tempdir().unwrap();
        let rootfs = dir.path().join("rootfs");
        std::fs::create_dir_all(rootfs.join("bin")).unwrap();
        std::fs::write(dir.path().join("secret"), b"host").unwrap();
        std::fs::write(rootfs.join("bin/app.wasm"), b"\0asm\x01\0\0\0").unwrap();
        std::os::unix::fs::symlink("../../secret", rootfs.join("bin/escape.wasm")).unwrap();
        let (path, bytes) = read_program(&rootfs, "app.wasm", "/", "/bin").unwrap();
        assert_eq!((path.as_str(), bytes.len()), ("/bin/app.wasm", 8));
        // The symlink resolves against the rootfs, where there is no secret.
        let e = read_program(&rootfs, "/bin/escape.wasm", "/", "/bin").unwrap_err();
        assert!(e.to_string().contains("not found"), "{e}");
        let e = read_program(&rootfs, "/bin", "/", "/bin").unwrap_err();
        assert!(e.to_string().contains("not a regular file"), "{e}");
    }

    #[test]
    fn spec_becomes_an_instance_spec() {
        let dir = tempfile::tempdir().unwrap();
        let bundle = dir.path();
        std::fs::create_dir_all(bundle.join("rootfs")).unwrap();
        std::fs::create_dir_all(bundle.join("data")).unwrap();
        std::fs::write(bundle.join("rootfs/hello.wasm"), b"\0asm\x01\0\0\0").unwrap();
        let config = serde_json::json!({
            "ociVersion": "1.0.2",
            "root": {"path": "rootfs", "readonly": true},
            "process": {"args": ["/hello.wasm#main", "a"], "env": ["A=1", "B"], "cwd": "/",
                        "user": {"uid": 0, "gid": 0}},
            "mounts": [
                {"destination": "/proc", "type": "proc", "source": "proc"},
                {"destination": "/data", "type": "bind",
                 "source": bundle.join("data"), "options": ["rbind", "ro"]}
            ],
            "linux": {"resources": {"memory": {"limit": 1048576}}}
        });
        std::fs::write(bundle.join("config.json"), config.to_string()).unwrap();
        let (s, bytes) = load(bundle).unwrap();
        assert_eq!(bytes.unwrap().len(), 8);
        assert_eq!(s.args, vec!["/hello.wasm", "a"]);
        assert_eq!(s.function, "main");
        assert_eq!(
            s.env,
            vec![("A".into(), "1".into()), ("B".into(), String::new())]
        );
        assert_eq!(s.memory_limit, 1 << 20);
        assert_eq!(s.preopens.len(), 2, "{:?}", s.preopens);
        assert!(s.preopens[0].readonly && s.preopens[0].guest == "/");
        assert_eq!(s.preopens[1].guest, "/data");
        assert!(s.preopens[1].readonly);
    }
}
