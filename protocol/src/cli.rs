//! The shim command line containerd uses: Go `flag` syntax (one or two
//! dashes, `-name value` or `-name=value`), then the action.

use std::fmt;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Args {
    pub namespace: String,
    pub address: String,
    pub publish_binary: String,
    pub id: String,
    pub bundle: String,
    pub socket: String,
    pub debug: bool,
    pub version: bool,
    pub info: bool,
    pub action: Option<Action>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Start,
    Delete,
}

#[derive(Debug, PartialEq, Eq)]
pub struct UsageError(pub String);

impl fmt::Display for UsageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

fn parse_bool(name: &str, v: &str) -> Result<bool, UsageError> {
    match v {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Ok(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Ok(false),
        _ => Err(UsageError(format!(
            "invalid boolean value {v:?} for flag -{name}"
        ))),
    }
}

impl Args {
    /// Parses `argv[1..]`.
    pub fn parse<I, S>(args: I) -> Result<Args, UsageError>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let mut out = Args::default();
        let mut it = args.into_iter().map(Into::into);
        let mut positional = Vec::new();
        while let Some(arg) = it.next() {
            if positional.is_empty() && arg.len() > 1 && arg.starts_with('-') {
                if arg == "--" {
                    positional.extend(it.by_ref());
                    break;
                }
                let flag = arg.trim_start_matches('-');
                let (name, inline) = match flag.split_once('=') {
                    Some((n, v)) => (n, Some(v.to_string())),
                    None => (flag, None),
                };
                match name {
                    "debug" | "v" | "version" | "info" => {
                        let v = match &inline {
                            Some(v) => parse_bool(name, v)?,
                            None => true,
                        };
                        match name {
                            "debug" => out.debug = v,
                            "info" => out.info = v,
                            _ => out.version = v,
                        }
                    }
                    "namespace" | "address" | "publish-binary" | "id" | "bundle" | "socket" => {
                        let value = match inline {
                            Some(v) => v,
                            None => it.next().ok_or_else(|| {
                                UsageError(format!("flag needs an argument: -{name}"))
                            })?,
                        };
                        let slot = match name {
                            "namespace" => &mut out.namespace,
                            "address" => &mut out.address,
                            "publish-binary" => &mut out.publish_binary,
                            "id" => &mut out.id,
                            "bundle" => &mut out.bundle,
                            _ => &mut out.socket,
                        };
                        *slot = value;
                    }
                    _ => {
                        return Err(UsageError(format!(
                            "flag provided but not defined: -{name}"
                        )))
                    }
                }
            } else {
                positional.push(arg);
            }
        }
        out.action = match positional.first().map(String::as_str) {
            None => None,
            Some("start") => Some(Action::Start),
            Some("delete") => Some(Action::Delete),
            Some(other) => {
                return Err(UsageError(format!(
                    "unknown action {other:?}: expected start or delete"
                )))
            }
        };
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn containerd_start_command_line_parses() {
        let a = Args::parse([
            "-namespace",
            "k8s.io",
            "-address",
            "/run/containerd/containerd.sock",
            "-publish-binary",
            "/usr/bin/containerd",
            "-id",
            "abc",
            "-debug",
            "start",
        ])
        .unwrap();
        assert_eq!(a.namespace, "k8s.io");
        assert_eq!(a.address, "/run/containerd/containerd.sock");
        assert_eq!(a.publish_binary, "/usr/bin/containerd");
        assert_eq!(a.id, "abc");
        assert!(a.debug);
        assert_eq!(a.action, Some(Action::Start));
    }

    #[test]
    fn equals_form_double_dash_and_delete_parse() {
        let a = Args::parse(["--namespace=default", "-id=x", "-bundle", "/b", "delete"]).unwrap();
        assert_eq!(a.namespace, "default");
        assert_eq!(a.id, "x");
        assert_eq!(a.bundle, "/b");
        assert_eq!(a.action, Some(Action::Delete));
        assert!(!a.debug);
    }

    #[test]
    fn version_and_info_flags_need_no_action() {
        assert!(Args::parse(["-v"]).unwrap().version);
        assert!(Args::parse(["--version"]).unwrap().version);
        let a = Args::parse(["-info"]).unwrap();
        assert!(a.info);
        assert_eq!(a.action, None);
    }

    #[test]
    fn bad_command_lines_are_refused_with_the_reason() {
        assert_eq!(
            Args::parse(["-bogus", "start"]).unwrap_err().0,
            "flag provided but not defined: -bogus"
        );
        assert_eq!(
            Args::parse(["-id"]).unwrap_err().0,
            "flag needs an argument: -id"
        );
        assert!(Args::parse(["run"])
            .unwrap_err()
            .0
            .contains("unknown action"));
        assert!(Args::parse(["-debug=maybe"]).is_err());
    }
}
