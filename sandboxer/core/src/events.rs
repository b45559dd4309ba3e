//! Task events to containerd: `Events.Forward` over ttrpc on containerd's
//! `TTRPC_ADDRESS`. One ordered queue per containerd, retried across
//! containerd restarts, so the README's per-task order holds.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use containerd_shim_protos::shim::event::Envelope;
use containerd_shim_protos::shim::events::ForwardRequest;
use protobuf::{Message, MessageDyn};
use tokio::sync::mpsc;

pub use kuasar_host::to_any;

use crate::rpc::client::Client;
use crate::task::timestamp_now;

const SERVICE: &str = "containerd.services.events.ttrpc.v1.Events";
/// How long one event is retried before it is dropped (containerd down).
const GIVE_UP_AFTER: Duration = Duration::from_secs(300);
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Default)]
pub struct Publisher {
    queues: Mutex<HashMap<String, mpsc::UnboundedSender<Envelope>>>,
}

impl Publisher {
    /// Queues `event` on `topic` for the containerd listening at `address`.
    pub fn publish(&self, address: &str, namespace: &str, topic: &str, event: &dyn MessageDyn) {
        if address.is_empty() {
            tracing::debug!("no containerd ttrpc address known; dropping {topic}");
            return;
        }
        let mut env = Envelope::new();
        env.timestamp = Some(timestamp_now()).into();
        env.namespace = namespace.into();
        env.topic = topic.into();
        env.event = Some(to_any(event)).into();
        tracing::debug!(namespace, topic, "event");
        let mut queues = self.queues.lock().unwrap();
        let tx = queues.entry(address.to_string()).or_insert_with(|| {
            let (tx, rx) = mpsc::unbounded_channel();
            tokio::spawn(forward_loop(address.to_string(), rx));
            tx
        });
        let _ = tx.send(env);
    }
}

async fn forward_loop(address: String, mut rx: mpsc::UnboundedReceiver<Envelope>) {
    let mut client: Option<Client> = None;
    while let Some(env) = rx.recv().await {
        let mut req = ForwardRequest::new();
        let namespace = env.namespace.clone();
        let topic = env.topic.clone();
        req.envelope = Some(env).into();
        let payload = req.write_to_bytes().unwrap_or_default();
        let started = Instant::now();
        let mut backoff = Duration::from_millis(50);
        loop {
            if client.is_none() {
                client = Client::connect(&address).await.ok();
            }
            if let Some(c) = client.as_mut() {
                match c
                    .call(
                        SERVICE,
                        "Forward",
                        payload.clone(),
                        &namespace,
                        CALL_TIMEOUT,
                    )
                    .await
                {
                    Ok(_) => break,
                    Err(e) => {
                        tracing::debug!("forwarding {topic} to {address}: {e}");
                        client = None;
                    }
                }
            }
            if started.elapsed() > GIVE_UP_AFTER {
                tracing::warn!("dropping event {topic}: containerd at {address} unreachable");
                break;
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use containerd_shim_protos::events::task::TaskExit;

    #[test]
    fn any_type_url_is_the_bare_message_name() {
        let mut e = TaskExit::new();
        e.container_id = "c".into();
        let any = to_any(&e);
        assert_eq!(any.type_url, "containerd.events.TaskExit");
        assert_eq!(
            TaskExit::parse_from_bytes(&any.value).unwrap().container_id,
            "c"
        );
    }
}
