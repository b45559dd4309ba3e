use std::fmt;
use std::str::FromStr;

/// The backend a shim binary asks for; the only difference between the three
/// shim binaries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    Runc,
    Wasm,
    Vmm,
}

impl Kind {
    pub const ALL: [Kind; 3] = [Kind::Runc, Kind::Wasm, Kind::Vmm];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Runc => "runc",
            Kind::Wasm => "wasm",
            Kind::Vmm => "vmm",
        }
    }

    /// The binary containerd resolves for `io.containerd.kuasar<kind>.v1`.
    pub fn shim_binary(self) -> &'static str {
        match self {
            Kind::Runc => "containerd-shim-kuasarrunc-v1",
            Kind::Wasm => "containerd-shim-kuasarwasm-v1",
            Kind::Vmm => "containerd-shim-kuasarvmm-v1",
        }
    }

    /// The containerd runtime type that selects this kind.
    pub fn runtime_type(self) -> &'static str {
        match self {
            Kind::Runc => "io.containerd.kuasarrunc.v1",
            Kind::Wasm => "io.containerd.kuasarwasm.v1",
            Kind::Vmm => "io.containerd.kuasarvmm.v1",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Kind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Kind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| format!("unknown sandbox kind {s:?} (known: runc, wasm, vmm)"))
    }
}
