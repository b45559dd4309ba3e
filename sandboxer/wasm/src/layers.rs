//! Programs shipped as wasm layers of an OCI image (media types
//! `application/vnd.w3c.wasm.module.v1+wasm` and
//! `application/vnd.bytecodealliance.wasm.component.layer.v0+wasm`) rather
//! than as files in the rootfs: read from containerd's content store.

use serde_json::Value;

use super::engine;
use crate::containerd::{Client, Descriptor};
use kuasar_core::error::{Error, Result};

pub const MODULE_LAYER: &str = "application/vnd.w3c.wasm.module.v1+wasm";
pub const COMPONENT_LAYER: &str = "application/vnd.bytecodealliance.wasm.component.layer.v0+wasm";
const TITLE: &str = "org.opencontainers.image.title";

fn is_index(media_type: &str) -> bool {
    media_type == "application/vnd.oci.image.index.v1+json"
        || media_type == "application/vnd.docker.distribution.manifest.list.v2+json"
}

fn descriptor(v: &Value) -> Option<Descriptor> {
    Some(Descriptor {
        media_type: v.get("mediaType")?.as_str()?.to_string(),
        digest: v.get("digest")?.as_str()?.to_string(),
        size: v.get("size")?.as_i64()?,
        annotations: v
            .get("annotations")
            .and_then(|a| serde_json::from_value(a.clone()).ok())
            .unwrap_or_default(),
    })
}

fn parse(bytes: &[u8], what: &str) -> Result<Value> {
    serde_json::from_slice(bytes).map_err(|e| Error::InvalidArgument(format!("{what}: {e}")))
}

/// The manifest of an index meant for WASI (os wasip1 or architecture
/// wasm), else its only manifest.
fn pick_manifest(index: &Value) -> Option<Descriptor> {
    let manifests = index.get("manifests")?.as_array()?;
    let wasi = manifests.iter().find(|m| {
        let p = m.get("platform");
        let field = |k: &str| p.and_then(|p| p.get(k)).and_then(Value::as_str);
        field("os").is_some_and(|os| os.starts_with("wasi"))
            || field("architecture") == Some("wasm")
    });
    match (wasi, manifests.len()) {
        (Some(m), _) => descriptor(m),
        (None, 1) => descriptor(&manifests[0]),
        _ => None,
    }
}

/// The wasm layer to run: the one titled like `wanted`'s file name, else
/// the only one, else the first component, else the first module.
fn pick_layer(manifest: &Value, wanted: &str) -> Option<Descriptor> {
    let layers: Vec<Descriptor> = manifest
        .get("layers")?
        .as_array()?
        .iter()
        .filter_map(descriptor)
        .filter(|d| d.media_type == MODULE_LAYER || d.media_type == COMPONENT_LAYER)
        .collect();
    let name = wanted.rsplit('/').next().unwrap_or(wanted);
    layers
        .iter()
        .find(|d| d.annotations.get(TITLE).map(String::as_str) == Some(name))
        .or(if layers.len() == 1 {
            layers.first()
        } else {
            None
        })
        .or_else(|| layers.iter().find(|d| d.media_type == COMPONENT_LAYER))
        .or(layers.first())
        .cloned()
}

/// Reads the program from the wasm layers of container `id`'s image.
/// Returns where it came from, and its bytes.
pub async fn program_from_image(
    address: &str,
    namespace: &str,
    id: &str,
    wanted: &str,
) -> Result<(String, Vec<u8>)> {
    let mut client = Client::connect(address, namespace).await?;
    let image = client.container_image(id).await?;
    if image.is_empty() {
        return Err(Error::NotFound(format!("container {id} names no image")));
    }
    let mut target = client.image_target(&image).await?;
    if is_index(&target.media_type) {
        let index = parse(&client.read(&target).await?, &target.digest)?;
        target = pick_manifest(&index).ok_or_else(|| {
            Error::NotFound(format!("image {image} has no manifest for wasip1/wasm"))
        })?;
    }
    let manifest = parse(&client.read(&target).await?, &target.digest)?;
    let layer = pick_layer(&manifest, wanted)
        .ok_or_else(|| Error::NotFound(format!("image {image} has no wasm layer")))?;
    let bytes = client.read(&layer).await?;
    let digest = format!("sha256:{}", engine::hex(&engine::digest(&bytes)));
    if digest != layer.digest {
        return Err(Error::Unavailable(format!(
            "layer {} of image {image} reads back as {digest}",
            layer.digest
        )));
    }
    Ok((format!("{image} layer {}", layer.digest), bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(mt: &str, digest: &str, title: Option<&str>) -> Value {
        let mut l = serde_json::json!({"mediaType": mt, "digest": digest, "size": 1});
        if let Some(t) = title {
            l["annotations"] = serde_json::json!({ TITLE: t });
        }
        l
    }

    #[test]
    fn the_wasi_manifest_of_an_index_is_chosen() {
        let m = |os: &str, arch: &str, d: &str| {
            serde_json::json!({"mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": d, "size": 1, "platform": {"os": os, "architecture": arch}})
        };
        let index =
            serde_json::json!({"manifests": [m("linux", "amd64", "a"), m("wasip1", "wasm", "b")]});
        assert_eq!(pick_manifest(&index).unwrap().digest, "b");
        let index =
            serde_json::json!({"manifests": [m("linux", "amd64", "a"), m("linux", "arm64", "c")]});
        assert!(pick_manifest(&index).is_none());
        let index = serde_json::json!({"manifests": [m("linux", "amd64", "a")]});
        assert_eq!(pick_manifest(&index).unwrap().digest, "a");
    }

    #[test]
    fn the_layer_is_chosen_by_title_then_kind() {
        let manifest = serde_json::json!({"layers": [
            layer("application/vnd.oci.image.layer.v1.tar+gzip", "tar", None),
            layer(MODULE_LAYER, "m1", Some("one.wasm")),
            layer(COMPONENT_LAYER, "c1", Some("two.wasm")),
        ]});
        assert_eq!(pick_layer(&manifest, "/one.wasm").unwrap().digest, "m1");
        assert_eq!(pick_layer(&manifest, "two.wasm").unwrap().digest, "c1");
        assert_eq!(pick_layer(&manifest, "other.wasm").unwrap().digest, "c1");
        let only = serde_json::json!({"layers": [layer(MODULE_LAYER, "m1", None)]});
        assert_eq!(pick_layer(&only, "anything").unwrap().digest, "m1");
        let none = serde_json::json!({"layers": [layer("application/vnd.oci.image.layer.v1.tar", "t", None)]});
        assert!(pick_layer(&none, "x").is_none());
    }
}
