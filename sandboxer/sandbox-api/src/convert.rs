//! Conversions between this crate's types and the two generated wire types
//! (prost for gRPC, rust-protobuf for ttrpc).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use protobuf::well_known_types::{any::Any as PbAny, timestamp::Timestamp as PbTimestamp};
use protobuf::MessageField;

use crate::proto::containerd::types as grpc_types;
use crate::types::{Any, Mount, Platform, SandboxRecord};

/// Seconds and nanoseconds since the Unix epoch, nanos always in 0..1e9.
fn split(t: SystemTime) -> (i64, i32) {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => (d.as_secs() as i64, d.subsec_nanos() as i32),
        Err(e) => {
            let d = e.duration();
            let (secs, nanos) = (d.as_secs() as i64, d.subsec_nanos() as i32);
            if nanos == 0 {
                (-secs, 0)
            } else {
                (-secs - 1, 1_000_000_000 - nanos)
            }
        }
    }
}

fn join(seconds: i64, nanos: i32) -> SystemTime {
    let nanos = nanos.clamp(0, 999_999_999) as u32;
    if seconds >= 0 {
        UNIX_EPOCH + Duration::new(seconds as u64, nanos)
    } else {
        UNIX_EPOCH - Duration::from_secs(seconds.unsigned_abs())
            + Duration::from_nanos(nanos as u64)
    }
}

pub(crate) fn to_prost_time(t: Option<SystemTime>) -> Option<prost_types::Timestamp> {
    t.map(|t| {
        let (seconds, nanos) = split(t);
        prost_types::Timestamp { seconds, nanos }
    })
}

pub(crate) fn from_prost_time(t: Option<prost_types::Timestamp>) -> Option<SystemTime> {
    t.map(|t| join(t.seconds, t.nanos))
}

pub(crate) fn to_pb_time(t: Option<SystemTime>) -> MessageField<PbTimestamp> {
    match t {
        Some(t) => {
            let (seconds, nanos) = split(t);
            let mut ts = PbTimestamp::new();
            ts.seconds = seconds;
            ts.nanos = nanos;
            MessageField::some(ts)
        }
        None => MessageField::none(),
    }
}

pub(crate) fn from_prost_any(a: prost_types::Any) -> Any {
    Any {
        type_url: a.type_url,
        value: a.value,
    }
}

pub(crate) fn to_prost_any(a: Any) -> prost_types::Any {
    prost_types::Any {
        type_url: a.type_url,
        value: a.value,
    }
}

pub(crate) fn from_pb_any(a: MessageField<PbAny>) -> Option<Any> {
    a.into_option().map(|a| Any {
        type_url: a.type_url,
        value: a.value,
    })
}

pub(crate) fn to_pb_any(a: Option<Any>) -> MessageField<PbAny> {
    match a {
        Some(a) => {
            let mut any = PbAny::new();
            any.type_url = a.type_url;
            any.value = a.value;
            MessageField::some(any)
        }
        None => MessageField::none(),
    }
}

pub(crate) fn from_grpc_mount(m: grpc_types::Mount) -> Mount {
    Mount {
        kind: m.r#type,
        source: m.source,
        target: m.target,
        options: m.options,
    }
}

pub(crate) fn from_pb_mount(m: containerd_shim_protos::types::mount::Mount) -> Mount {
    Mount {
        kind: m.type_,
        source: m.source,
        target: m.target,
        options: m.options,
    }
}

pub(crate) fn to_grpc_platform(p: Platform) -> grpc_types::Platform {
    grpc_types::Platform {
        os: p.os,
        architecture: p.architecture,
        variant: p.variant,
        os_version: p.os_version,
    }
}

pub(crate) fn to_pb_platform(p: Platform) -> containerd_shim_protos::types::platform::Platform {
    let mut out = containerd_shim_protos::types::platform::Platform::new();
    out.os = p.os;
    out.architecture = p.architecture;
    out.variant = p.variant;
    out.os_version = p.os_version;
    out
}

pub(crate) fn from_grpc_sandbox(s: grpc_types::Sandbox) -> SandboxRecord {
    let (runtime_name, runtime_options) = match s.runtime {
        Some(r) => (r.name, r.options.map(from_prost_any)),
        None => (String::new(), None),
    };
    SandboxRecord {
        runtime_name,
        runtime_options,
        spec: s.spec.map(from_prost_any),
        labels: s.labels,
        extensions: s
            .extensions
            .into_iter()
            .map(|(k, v)| (k, from_prost_any(v)))
            .collect(),
        sandboxer: s.sandboxer,
        created_at: from_prost_time(s.created_at),
        updated_at: from_prost_time(s.updated_at),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_round_trip_on_both_sides_of_the_epoch() {
        for t in [
            UNIX_EPOCH,
            UNIX_EPOCH + Duration::new(1_700_000_000, 123_456_789),
            UNIX_EPOCH - Duration::new(5, 250_000_000),
            UNIX_EPOCH - Duration::from_secs(62_135_596_800),
        ] {
            let (s, n) = split(t);
            assert!((0..1_000_000_000).contains(&n));
            assert_eq!(join(s, n), t);
        }
        assert_eq!(
            split(UNIX_EPOCH - Duration::new(5, 250_000_000)),
            (-6, 750_000_000)
        );
    }
}
