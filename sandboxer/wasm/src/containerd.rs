//! A small client of containerd's own gRPC API: what the daemon reads of a
//! container's image (its manifest and layers) from the content store. The
//! messages are the few fields it needs of containerd's protos, declared
//! with prost; unknown fields are skipped on decode.

use std::collections::HashMap;

use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::{Channel, Endpoint};
use tonic_prost::ProstCodec;

use kuasar_core::error::{Error, Result};

#[derive(Clone, PartialEq, prost::Message)]
struct GetContainerRequest {
    #[prost(string, tag = "1")]
    id: String,
}

#[derive(Clone, PartialEq, prost::Message)]
struct ContainerMsg {
    #[prost(string, tag = "1")]
    id: String,
    #[prost(string, tag = "3")]
    image: String,
}

#[derive(Clone, PartialEq, prost::Message)]
struct GetContainerResponse {
    #[prost(message, optional, tag = "1")]
    container: Option<ContainerMsg>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct GetImageRequest {
    #[prost(string, tag = "1")]
    name: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Descriptor {
    #[prost(string, tag = "1")]
    pub media_type: String,
    #[prost(string, tag = "2")]
    pub digest: String,
    #[prost(int64, tag = "3")]
    pub size: i64,
    #[prost(map = "string, string", tag = "5")]
    pub annotations: HashMap<String, String>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct ImageMsg {
    #[prost(string, tag = "1")]
    name: String,
    #[prost(message, optional, tag = "3")]
    target: Option<Descriptor>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct GetImageResponse {
    #[prost(message, optional, tag = "1")]
    image: Option<ImageMsg>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct ReadContentRequest {
    #[prost(string, tag = "1")]
    digest: String,
    #[prost(int64, tag = "2")]
    offset: i64,
    #[prost(int64, tag = "3")]
    size: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
struct ReadContentResponse {
    #[prost(int64, tag = "1")]
    offset: i64,
    #[prost(bytes = "vec", tag = "2")]
    data: Vec<u8>,
}

/// Content larger than this is not read into memory.
const MAX_CONTENT: i64 = 256 << 20;

fn status_error(what: &str) -> impl FnOnce(tonic::Status) -> Error + '_ {
    move |s| match s.code() {
        tonic::Code::NotFound => Error::NotFound(format!("{what}: {}", s.message())),
        _ => Error::Unavailable(format!("{what}: containerd: {}", s.message())),
    }
}

/// containerd's API at `address`, in one namespace.
pub struct Client {
    grpc: tonic::client::Grpc<Channel>,
    namespace: String,
}

impl Client {
    pub async fn connect(address: &str, namespace: &str) -> Result<Client> {
        let path = address.strip_prefix("unix://").unwrap_or(address);
        let channel = Endpoint::from_shared(format!("unix://{path}"))
            .map_err(|e| Error::InvalidArgument(format!("containerd address {address}: {e}")))?
            .connect()
            .await
            .map_err(|e| {
                Error::Unavailable(format!("connecting to containerd at {address}: {e}"))
            })?;
        Ok(Client {
            grpc: tonic::client::Grpc::new(channel),
            namespace: namespace.into(),
        })
    }

    fn request<T>(&self, msg: T) -> tonic::Request<T> {
        let mut req = tonic::Request::new(msg);
        if let Ok(ns) = self.namespace.parse() {
            req.metadata_mut().insert("containerd-namespace", ns);
        }
        req
    }

    async fn unary<Q, R>(&mut self, path: &'static str, msg: Q, what: &str) -> Result<R>
    where
        Q: prost::Message + Send + Sync + 'static,
        R: prost::Message + Default + Send + Sync + 'static,
    {
        self.grpc
            .ready()
            .await
            .map_err(|e| Error::Unavailable(format!("containerd: {e}")))?;
        let req = self.request(msg);
        let resp = self
            .grpc
            .unary(
                req,
                PathAndQuery::from_static(path),
                ProstCodec::<Q, R>::default(),
            )
            .await
            .map_err(status_error(what))?;
        Ok(resp.into_inner())
    }

    /// The name of the image a container was made from.
    pub async fn container_image(&mut self, id: &str) -> Result<String> {
        let r: GetContainerResponse = self
            .unary(
                "/containerd.services.containers.v1.Containers/Get",
                GetContainerRequest { id: id.into() },
                &format!("container {id}"),
            )
            .await?;
        Ok(r.container.map(|c| c.image).unwrap_or_default())
    }

    /// The descriptor an image name points at (an index or a manifest).
    pub async fn image_target(&mut self, name: &str) -> Result<Descriptor> {
        let r: GetImageResponse = self
            .unary(
                "/containerd.services.images.v1.Images/Get",
                GetImageRequest { name: name.into() },
                &format!("image {name}"),
            )
            .await?;
        r.image
            .and_then(|i| i.target)
            .ok_or_else(|| Error::NotFound(format!("image {name} has no target")))
    }

    /// A blob of the content store, whole.
    pub async fn read(&mut self, desc: &Descriptor) -> Result<Vec<u8>> {
        if desc.size > MAX_CONTENT {
            return Err(Error::ResourceExhausted(format!(
                "{} is {} bytes, more than the {MAX_CONTENT} read from containerd",
                desc.digest, desc.size
            )));
        }
        self.grpc
            .ready()
            .await
            .map_err(|e| Error::Unavailable(format!("containerd: {e}")))?;
        let req = self.request(ReadContentRequest {
            digest: desc.digest.clone(),
            offset: 0,
            size: 0,
        });
        let what = format!("content {}", desc.digest);
        let mut stream = self
            .grpc
            .server_streaming(
                req,
                PathAndQuery::from_static("/containerd.services.content.v1.Content/Read"),
                ProstCodec::<ReadContentRequest, ReadContentResponse>::default(),
            )
            .await
            .map_err(status_error(&what))?
            .into_inner();
        let mut data = Vec::with_capacity(desc.size.max(0) as usize);
        while let Some(chunk) = stream.message().await.map_err(status_error(&what))? {
            if chunk.offset != data.len() as i64 {
                return Err(Error::Unavailable(format!("{what}: chunk out of order")));
            }
            data.extend_from_slice(&chunk.data);
            if data.len() as i64 > MAX_CONTENT {
                return Err(Error::ResourceExhausted(format!("{what}: too large")));
            }
        }
        Ok(data)
    }
}
