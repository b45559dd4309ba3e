//! Task events to containerd: `Events.Forward` over ttrpc on containerd's
//! `TTRPC_ADDRESS`. One ordered queue per containerd, so the README's
//! per-task order holds.
//!
//! Every event is spooled to `<root>/events/<address hash>/<seq>.bin` before
//! it is queued and removed once containerd acknowledged it: events outlive
//! a containerd restart, a live upgrade and a restart of the daemon, which
//! queues what it finds in the spool before anything new. An event is
//! retried until containerd takes it or it is older than the retry window;
//! one given up on is logged as a warning that names it. An event sent but
//! not yet acknowledged when the daemon dies (or a stop outlasts its bound)
//! is sent again: containerd copes with a duplicate, not with a lost exit.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use containerd_shim_protos::shim::event::Envelope;
use containerd_shim_protos::shim::events::ForwardRequest;
use protobuf::{Message, MessageDyn};
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;

pub use kuasar_host::to_any;

use crate::error::Error;
use crate::rpc::client::Client;
use crate::task::{from_nanos, timestamp};

const SERVICE: &str = "containerd.services.events.ttrpc.v1.Events";
/// How long an event is retried (containerd away) before it is dropped.
pub const GIVE_UP_AFTER: Duration = Duration::from_secs(300);
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a stop waits for a call in flight before cutting it off.
const STOP_LIMIT: Duration = Duration::from_secs(6);
const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// Spool file: magic, address length (u32 LE), address, encoded envelope,
/// FNV-1a 64 (LE) of everything before it.
const MAGIC: &[u8; 4] = b"KEV1";

/// What an event is, for the log.
#[derive(Clone, Debug)]
struct Label {
    namespace: String,
    topic: String,
    /// The container's id, with the exec's where there is one.
    id: String,
    published: SystemTime,
}

impl Label {
    fn age(&self) -> Duration {
        SystemTime::now()
            .duration_since(self.published)
            .unwrap_or_default()
    }
}

/// One queued event.
#[derive(Clone)]
struct Event {
    /// Its spool file; `None` when it could not be written (then the event
    /// lives in this process only, which was logged).
    file: Option<PathBuf>,
    envelope: Vec<u8>,
    label: Label,
}

/// The events for one containerd, in order.
struct Queue {
    address: String,
    dir: PathBuf,
    events: Mutex<VecDeque<Event>>,
    more: Notify,
    stop: watch::Sender<bool>,
    forwarder: Mutex<Option<JoinHandle<()>>>,
}

#[derive(Default)]
struct State {
    queues: HashMap<String, Arc<Queue>>,
    /// Forwarding is stopped (a live upgrade is under way): new events are
    /// only spooled, for the next image to send.
    stopped: bool,
}

pub struct Publisher {
    dir: PathBuf,
    window: Duration,
    seq: AtomicU64,
    state: Mutex<State>,
}

impl Publisher {
    /// A publisher spooling under `dir`; what an earlier process left there
    /// is queued (and its forwarding started) before this returns. Needs a
    /// tokio runtime.
    pub fn new(dir: PathBuf) -> Publisher {
        Publisher::with_window(dir, GIVE_UP_AFTER)
    }

    /// [`Publisher::new`] with another retry window.
    pub fn with_window(dir: PathBuf, window: Duration) -> Publisher {
        let spooled = load_spool(&dir);
        let next = spooled.iter().map(|(seq, _, _)| seq + 1).max().unwrap_or(0);
        let publisher = Publisher {
            dir,
            window,
            seq: AtomicU64::new(next),
            state: Mutex::new(State::default()),
        };
        let mut by_address: HashMap<String, Vec<Event>> = HashMap::new();
        for (_, address, event) in spooled {
            by_address.entry(address).or_default().push(event);
        }
        for (address, events) in by_address {
            tracing::info!(
                address,
                events = events.len(),
                "re-queueing spooled events for containerd"
            );
            let queue = publisher.queue(&address);
            queue.events.lock().unwrap().extend(events);
            queue.more.notify_one();
        }
        publisher
    }

    /// Queues `event` on `topic` for the containerd listening at `address`.
    pub fn publish(&self, address: &str, namespace: &str, topic: &str, event: &dyn MessageDyn) {
        let id = event_id(event);
        if address.is_empty() {
            tracing::warn!(
                topic = %topic,
                namespace = %namespace,
                id = %id,
                "event dropped: no containerd ttrpc address is known for it"
            );
            return;
        }
        let now = SystemTime::now();
        let mut env = Envelope::new();
        env.timestamp = Some(timestamp(now)).into();
        env.namespace = namespace.into();
        env.topic = topic.into();
        env.event = Some(to_any(event)).into();
        let envelope = match env.write_to_bytes() {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(
                    topic = %topic,
                    namespace = %namespace,
                    id = %id,
                    "event dropped: encoding it: {e}"
                );
                return;
            }
        };
        tracing::debug!(namespace, topic, id, "event");
        let label = Label {
            namespace: namespace.into(),
            topic: topic.into(),
            id,
            published: now,
        };
        let queue = self.queue(address);
        // Numbered, written and queued under the queue's lock: the spool's
        // order is the queue's.
        let mut events = queue.events.lock().unwrap();
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        let file = queue.dir.join(format!("{seq:020}.bin"));
        let file = match kuasar_protocol::shim::write_atomic(&file, &encode(address, &envelope)) {
            Ok(()) => Some(file),
            Err(e) => {
                tracing::warn!(
                    topic = %label.topic,
                    namespace = %label.namespace,
                    id = %label.id,
                    "event not spooled (a restart of the daemon would lose it): writing {}: {e}",
                    file.display()
                );
                None
            }
        };
        events.push_back(Event {
            file,
            envelope,
            label,
        });
        drop(events);
        queue.more.notify_one();
    }

    /// The queue for `address`, made (and its forwarding started, unless
    /// stopped) on first use.
    fn queue(&self, address: &str) -> Arc<Queue> {
        let mut state = self.state.lock().unwrap();
        if let Some(q) = state.queues.get(address) {
            return q.clone();
        }
        let dir = self.dir.join(format!("{:016x}", fnv1a(address.as_bytes())));
        if let Err(e) = make_private_dir(&self.dir).and_then(|()| make_private_dir(&dir)) {
            tracing::warn!("event spool {}: {e}", dir.display());
        }
        let queue = Arc::new(Queue {
            address: address.into(),
            dir,
            events: Mutex::new(VecDeque::new()),
            more: Notify::new(),
            stop: watch::channel(state.stopped).0,
            forwarder: Mutex::new(None),
        });
        if !state.stopped {
            queue.start(self.window);
        }
        state.queues.insert(address.into(), queue.clone());
        queue
    }

    /// Stops every forwarding loop (a live upgrade): a call in flight is
    /// let finish (bounded), then nothing more is sent; new events are only
    /// spooled. Returns how many events wait in the spool.
    pub async fn stop_forwarding(&self) -> usize {
        let queues: Vec<Arc<Queue>> = {
            let mut state = self.state.lock().unwrap();
            state.stopped = true;
            state.queues.values().cloned().collect()
        };
        for q in &queues {
            q.stop.send_replace(true);
        }
        for q in &queues {
            let handle = q.forwarder.lock().unwrap().take();
            if let Some(mut h) = handle {
                if tokio::time::timeout(STOP_LIMIT, &mut h).await.is_err() {
                    h.abort();
                    let _ = h.await;
                    tracing::warn!(
                        address = %q.address,
                        "event forwarding cut off in a call: that event may reach containerd twice"
                    );
                }
            }
        }
        let waiting = queues.iter().map(|q| q.events.lock().unwrap().len()).sum();
        tracing::info!(spooled = waiting, "event forwarding stopped");
        waiting
    }

    /// Forwards again after [`Publisher::stop_forwarding`] (the upgrade
    /// failed).
    pub fn resume_forwarding(&self) {
        let mut state = self.state.lock().unwrap();
        state.stopped = false;
        for q in state.queues.values() {
            q.stop.send_replace(false);
            q.start(self.window);
        }
    }
}

impl Queue {
    fn start(self: &Arc<Self>, window: Duration) {
        let mut forwarder = self.forwarder.lock().unwrap();
        if forwarder.as_ref().is_some_and(|h| !h.is_finished()) {
            return;
        }
        *forwarder = Some(tokio::spawn(self.clone().forward(window)));
    }

    fn head(&self) -> Option<Event> {
        self.events.lock().unwrap().front().cloned()
    }

    /// The head event is done with: off the queue and out of the spool.
    fn pop(&self) {
        let done = self.events.lock().unwrap().pop_front();
        if let Some(file) = done.and_then(|e| e.file) {
            if let Err(e) = std::fs::remove_file(&file) {
                if e.kind() != io::ErrorKind::NotFound {
                    tracing::warn!(
                        "removing {} (the event may be sent again): {e}",
                        file.display()
                    );
                }
            }
        }
    }

    /// Sends the queued events in order until stopped.
    async fn forward(self: Arc<Self>, window: Duration) {
        let mut stop = self.stop.subscribe();
        let mut client: Option<Client> = None;
        let mut backoff = BACKOFF_MIN;
        loop {
            if *stop.borrow_and_update() {
                return;
            }
            let Some(event) = self.head() else {
                tokio::select! {
                    _ = self.more.notified() => {}
                    _ = stop.changed() => {}
                }
                continue;
            };
            match send(&self.address, &mut client, &event.envelope).await {
                Ok(()) => {
                    self.pop();
                    backoff = BACKOFF_MIN;
                }
                // containerd answered no: sending it again cannot help.
                Err(Error::Runtime { message, .. }) => {
                    let l = &event.label;
                    tracing::warn!(
                        topic = %l.topic,
                        namespace = %l.namespace,
                        id = %l.id,
                        address = %self.address,
                        "event dropped: containerd refused it: {message}"
                    );
                    self.pop();
                }
                Err(e) => {
                    client = None;
                    let l = &event.label;
                    let age = l.age();
                    if age > window {
                        tracing::warn!(
                            topic = %l.topic,
                            namespace = %l.namespace,
                            id = %l.id,
                            age_secs = age.as_secs(),
                            address = %self.address,
                            "event dropped: containerd unreachable for longer than the retry window of {}s: {e}",
                            window.as_secs()
                        );
                        self.pop();
                        continue;
                    }
                    tracing::debug!(topic = %l.topic, id = %l.id, "forwarding to {}: {e}", self.address);
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = stop.changed() => {}
                    }
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
            }
        }
    }
}

/// One `Events.Forward` call, on `client` (connected first if need be).
async fn send(
    address: &str,
    client: &mut Option<Client>,
    envelope: &[u8],
) -> crate::error::Result<()> {
    let env = Envelope::parse_from_bytes(envelope)
        .map_err(|e| Error::Internal(format!("queued envelope: {e}")))?;
    let mut req = ForwardRequest::new();
    let namespace = env.namespace.clone();
    req.envelope = Some(env).into();
    let payload = req
        .write_to_bytes()
        .map_err(|e| Error::Internal(format!("encoding ForwardRequest: {e}")))?;
    if client.is_none() {
        *client = Some(Client::connect(address).await?);
    }
    let c = client.as_mut().expect("connected above");
    c.call(SERVICE, "Forward", payload, &namespace, CALL_TIMEOUT)
        .await
        .map(|_| ())
}

/// The container id an event names, with its exec id where it has one.
fn event_id(event: &dyn MessageDyn) -> String {
    let d = event.descriptor_dyn();
    let field = |name: &str| {
        d.field_by_name(name)
            .and_then(|f| {
                f.get_singular_field_or_default(event)
                    .to_str()
                    .map(str::to_string)
            })
            .unwrap_or_default()
    };
    let container = field("container_id");
    let exec = [field("exec_id"), field("id")]
        .into_iter()
        .find(|e| !e.is_empty() && *e != container);
    match exec {
        Some(exec) => format!("{container} exec {exec}"),
        None => container,
    }
}

/// What a spooled envelope says of itself.
fn label_of(env: &Envelope) -> Label {
    let id = env
        .event
        .as_ref()
        .and_then(|any| {
            let name = any.type_url.strip_prefix("containerd.events.")?;
            containerd_shim_protos::events::task::file_descriptor()
                .message_by_package_relative_name(name)?
                .parse_from_bytes(&any.value)
                .ok()
        })
        .map(|m| event_id(&*m))
        .unwrap_or_default();
    let ts = env.timestamp.as_ref();
    Label {
        namespace: env.namespace.clone(),
        topic: env.topic.clone(),
        id,
        published: from_nanos(
            ts.map(|t| t.seconds * 1_000_000_000 + i64::from(t.nanos))
                .unwrap_or(0),
        ),
    }
}

fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}

fn make_private_dir(dir: &Path) -> io::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

fn encode(address: &str, envelope: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + address.len() + envelope.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(address.len() as u32).to_le_bytes());
    out.extend_from_slice(address.as_bytes());
    out.extend_from_slice(envelope);
    let sum = fnv1a(&out);
    out.extend_from_slice(&sum.to_le_bytes());
    out
}

/// The address and envelope of a spool file, checked.
fn decode(data: &[u8]) -> std::result::Result<(String, Vec<u8>, Envelope), String> {
    let body_len = data
        .len()
        .checked_sub(8)
        .filter(|&n| n >= MAGIC.len() + 4)
        .ok_or("too short")?;
    let (body, sum) = data.split_at(body_len);
    if body[..4] != MAGIC[..] {
        return Err("not an event spool file".into());
    }
    if fnv1a(body).to_le_bytes() != sum {
        return Err("checksum mismatch".into());
    }
    let len = u32::from_le_bytes(body[4..8].try_into().expect("4 bytes")) as usize;
    let rest = &body[8..];
    if len > rest.len() {
        return Err("address length past the end".into());
    }
    let address = std::str::from_utf8(&rest[..len]).map_err(|_| "address is not UTF-8")?;
    let envelope = rest[len..].to_vec();
    let env = Envelope::parse_from_bytes(&envelope).map_err(|e| format!("envelope: {e}"))?;
    if address.is_empty() || env.topic.is_empty() || env.event.is_none() {
        return Err("address, topic or event missing".into());
    }
    Ok((address.to_string(), envelope, env))
}

/// Every event spooled under `dir`, by sequence number; what cannot be read
/// is logged and removed.
fn load_spool(dir: &Path) -> Vec<(u64, String, Event)> {
    let mut out = Vec::new();
    let Ok(queues) = std::fs::read_dir(dir) else {
        return out;
    };
    for q in queues.flatten() {
        let Ok(files) = std::fs::read_dir(q.path()) else {
            continue;
        };
        for f in files.flatten() {
            let path = f.path();
            let name = f.file_name().to_string_lossy().into_owned();
            let seq = name
                .strip_suffix(".bin")
                .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|s| s.parse::<u64>().ok());
            let read = match seq {
                Some(seq) => std::fs::read(&path)
                    .map_err(|e| e.to_string())
                    .and_then(|data| decode(&data))
                    .map(|d| (seq, d)),
                // A write the process did not finish, or a stranger.
                None => Err("not a spooled event".into()),
            };
            match read {
                Ok((seq, (address, envelope, env))) => out.push((
                    seq,
                    address,
                    Event {
                        file: Some(path),
                        label: label_of(&env),
                        envelope,
                    },
                )),
                Err(why) => {
                    tracing::warn!(
                        "event spool: skipping and removing {}: {why}",
                        path.display()
                    );
                    if let Err(e) = std::fs::remove_file(&path) {
                        tracing::warn!("removing {}: {e}", path.display());
                    }
                }
            }
        }
    }
    out.sort_by_key(|(seq, _, _)| *seq);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rpc::{Handler, RequestContext};
    use async_trait::async_trait;
    use containerd_shim_protos::events::task::{TaskCreate, TaskExecAdded, TaskExit, TaskStart};

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

    /// containerd's events service: records (topic, id) of what it takes.
    #[derive(Default)]
    struct Containerd(Mutex<Vec<(String, String)>>);

    #[async_trait]
    impl Handler for Containerd {
        async fn handle(
            &self,
            _: RequestContext,
            service: &str,
            method: &str,
            payload: &[u8],
        ) -> crate::error::Result<Vec<u8>> {
            assert_eq!((service, method), (SERVICE, "Forward"));
            let env = ForwardRequest::parse_from_bytes(payload)
                .unwrap()
                .envelope
                .unwrap();
            let label = label_of(&env);
            self.0.lock().unwrap().push((label.topic, label.id));
            Ok(containerd_shim_protos::api::Empty::new()
                .write_to_bytes()
                .unwrap())
        }
    }

    impl Containerd {
        fn got(&self) -> Vec<(String, String)> {
            self.0.lock().unwrap().clone()
        }
    }

    fn serve(path: &Path) -> (Arc<Containerd>, JoinHandle<()>) {
        let c = Arc::new(Containerd::default());
        let listener = tokio::net::UnixListener::bind(path).unwrap();
        let h = tokio::spawn(crate::rpc::server::serve_listener(
            listener,
            c.clone(),
            crate::rpc::server::ConnScope::unparked(),
        ));
        (c, h)
    }

    fn exit(id: &str, status: u32) -> TaskExit {
        let mut e = TaskExit::new();
        e.container_id = id.into();
        e.id = id.into();
        e.exit_status = status;
        e
    }

    fn create(id: &str) -> TaskCreate {
        let mut e = TaskCreate::new();
        e.container_id = id.into();
        e
    }

    fn start(id: &str) -> TaskStart {
        let mut e = TaskStart::new();
        e.container_id = id.into();
        e
    }

    fn spooled(dir: &Path) -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .flat_map(|q| std::fs::read_dir(q.path()).into_iter().flatten().flatten())
            .map(|f| f.path())
            .collect();
        files.sort();
        files
    }

    async fn until(what: &str, mut ready: impl FnMut() -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !ready() {
            assert!(tokio::time::Instant::now() < deadline, "{what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(t, i)| (t.to_string(), i.to_string()))
            .collect()
    }

    /// What a subscriber wrote, for checking warnings.
    #[derive(Clone, Default)]
    struct Log(Arc<Mutex<Vec<u8>>>);

    impl io::Write for Log {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl Log {
        /// Captures this thread's log (the tests' runtime runs on it).
        fn capture() -> (Log, tracing::subscriber::DefaultGuard) {
            let log = Log::default();
            let writer = log.clone();
            let subscriber = tracing_subscriber::fmt()
                .with_writer(move || writer.clone())
                .with_ansi(false)
                .with_max_level(tracing::Level::INFO)
                .finish();
            (log, tracing::subscriber::set_default(subscriber))
        }

        fn text(&self) -> String {
            String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
        }
    }

    #[tokio::test]
    async fn spooled_events_are_sent_in_order_by_the_next_process_before_new_ones() {
        let tmp = tempfile::tempdir().unwrap();
        let spool = tmp.path().join("events");
        let sock = tmp.path().join("c.sock.ttrpc");
        let address = sock.to_str().unwrap();
        // containerd is away: everything stays spooled.
        let first = Publisher::new(spool.clone());
        first.publish(address, "ns", "/tasks/create", &create("a"));
        first.publish(address, "ns", "/tasks/start", &start("a"));
        first.publish(address, "other", "/tasks/create", &create("b"));
        first.publish(address, "ns", "/tasks/exit", &exit("a", 7));
        assert_eq!(spooled(&spool).len(), 4);
        // A live upgrade: the loops stop; what comes now is only spooled.
        assert_eq!(first.stop_forwarding().await, 4);
        let mut added = TaskExecAdded::new();
        added.container_id = "b".into();
        added.exec_id = "e1".into();
        first.publish(address, "other", "/tasks/exec-added", &added);
        assert_eq!(spooled(&spool).len(), 5);
        drop(first);

        let (containerd, server) = serve(&sock);
        let second = Publisher::new(spool.clone());
        second.publish(address, "ns", "/tasks/delete", &create("a"));
        until("every event sent", || containerd.got().len() == 6).await;
        assert_eq!(
            containerd.got(),
            pairs(&[
                ("/tasks/create", "a"),
                ("/tasks/start", "a"),
                ("/tasks/create", "b"),
                ("/tasks/exit", "a"),
                ("/tasks/exec-added", "b exec e1"),
                ("/tasks/delete", "a"),
            ])
        );
        until("the spool emptied", || spooled(&spool).is_empty()).await;
        // Nothing is sent twice.
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(containerd.got().len(), 6);
        server.abort();
    }

    #[tokio::test]
    async fn a_stopped_publisher_resumes_where_it_stopped() {
        let tmp = tempfile::tempdir().unwrap();
        let spool = tmp.path().join("events");
        let sock = tmp.path().join("c.sock.ttrpc");
        let address = sock.to_str().unwrap();
        let (containerd, server) = serve(&sock);
        let p = Publisher::new(spool.clone());
        p.publish(address, "ns", "/tasks/create", &create("a"));
        until("create sent", || containerd.got().len() == 1).await;
        p.stop_forwarding().await;
        p.publish(address, "ns", "/tasks/start", &start("a"));
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(containerd.got().len(), 1, "nothing sent while stopped");
        assert_eq!(spooled(&spool).len(), 1);
        p.resume_forwarding();
        until("start sent", || containerd.got().len() == 2).await;
        assert_eq!(containerd.got()[1], ("/tasks/start".into(), "a".into()));
        until("the spool emptied", || spooled(&spool).is_empty()).await;
        server.abort();
    }

    #[tokio::test]
    async fn an_event_past_the_retry_window_is_dropped_with_a_warning_naming_it() {
        let (log, _guard) = Log::capture();
        let tmp = tempfile::tempdir().unwrap();
        let spool = tmp.path().join("events");
        let address = tmp.path().join("absent.sock");
        let address = address.to_str().unwrap();
        let p = Publisher::with_window(spool.clone(), Duration::from_millis(300));
        p.publish(address, "k8s.io", "/tasks/exit", &exit("c1", 137));
        p.publish(address, "k8s.io", "/tasks/delete", &create("c1"));
        assert_eq!(spooled(&spool).len(), 2);
        until("both dropped", || spooled(&spool).is_empty()).await;
        let text = log.text();
        let drops: Vec<&str> = text
            .lines()
            .filter(|l| l.contains("WARN") && l.contains("event dropped"))
            .collect();
        assert_eq!(drops.len(), 2, "{text}");
        assert!(drops[0].contains("topic=/tasks/exit"), "{text}");
        assert!(drops[0].contains("namespace=k8s.io"), "{text}");
        assert!(drops[0].contains("id=c1"), "{text}");
        assert!(drops[0].contains("age_secs=0"), "{text}");
        assert!(drops[0].contains("retry window"), "{text}");
        assert!(drops[1].contains("topic=/tasks/delete"), "{text}");
    }

    #[tokio::test]
    async fn an_event_without_an_address_is_dropped_with_a_warning() {
        let (log, _guard) = Log::capture();
        let tmp = tempfile::tempdir().unwrap();
        let p = Publisher::new(tmp.path().join("events"));
        p.publish("", "ns", "/tasks/exit", &exit("c9", 0));
        let text = log.text();
        assert!(
            text.contains("WARN")
                && text.contains("no containerd ttrpc address")
                && text.contains("topic=/tasks/exit")
                && text.contains("id=c9"),
            "{text}"
        );
        assert!(spooled(&tmp.path().join("events")).is_empty());
    }

    #[tokio::test]
    async fn a_corrupt_spool_file_is_skipped_with_a_warning_and_removed() {
        let (log, _guard) = Log::capture();
        let tmp = tempfile::tempdir().unwrap();
        let spool = tmp.path().join("events");
        let address = tmp.path().join("c.sock.ttrpc");
        let address = address.to_str().unwrap();
        let p = Publisher::new(spool.clone());
        p.stop_forwarding().await;
        p.publish(address, "ns", "/tasks/create", &create("a"));
        p.publish(address, "ns", "/tasks/exit", &exit("a", 1));
        drop(p);
        let files = spooled(&spool);
        assert_eq!(files.len(), 2);
        let queue_dir = files[0].parent().unwrap().to_path_buf();
        // A flipped bit, a truncated file, garbage, and a write the
        // process never finished.
        let good = std::fs::read(&files[0]).unwrap();
        let mut flipped = good.clone();
        flipped[12] ^= 1;
        std::fs::write(queue_dir.join("00000000000000000100.bin"), &flipped).unwrap();
        std::fs::write(
            queue_dir.join("00000000000000000101.bin"),
            &good[..good.len() - 3],
        )
        .unwrap();
        std::fs::write(queue_dir.join("00000000000000000102.bin"), b"garbage").unwrap();
        std::fs::write(queue_dir.join(".00000000000000000103.bin.1.0.tmp"), b"half").unwrap();

        let (containerd, server) = serve(Path::new(address));
        let next = Publisher::new(spool.clone());
        until("the good events sent", || containerd.got().len() == 2).await;
        assert_eq!(
            containerd.got(),
            pairs(&[("/tasks/create", "a"), ("/tasks/exit", "a")])
        );
        until("the spool emptied", || spooled(&spool).is_empty()).await;
        let text = log.text();
        for (name, why) in [
            ("00000000000000000100.bin", "checksum mismatch"),
            ("00000000000000000101.bin", "checksum mismatch"),
            ("00000000000000000102.bin", "too short"),
            (".00000000000000000103.bin.1.0.tmp", "not a spooled event"),
        ] {
            assert!(
                text.lines().any(|l| l.contains("WARN")
                    && l.contains("skipping and removing")
                    && l.contains(name)
                    && l.contains(why)),
                "{name}: {text}"
            );
        }
        // New events are numbered after what was found.
        next.publish(address, "ns", "/tasks/delete", &create("a"));
        until("delete sent", || containerd.got().len() == 3).await;
        server.abort();
    }

    #[test]
    fn spool_files_round_trip_and_name_their_event() {
        let mut env = Envelope::new();
        env.namespace = "ns".into();
        env.topic = "/tasks/exit".into();
        env.timestamp = Some(crate::task::timestamp_now()).into();
        env.event = Some(to_any(&exit("c", 3))).into();
        let bytes = env.write_to_bytes().unwrap();
        let (address, envelope, parsed) = decode(&encode("/run/c.sock.ttrpc", &bytes)).unwrap();
        assert_eq!(address, "/run/c.sock.ttrpc");
        assert_eq!(envelope, bytes);
        let label = label_of(&parsed);
        assert_eq!(
            (
                label.namespace.as_str(),
                label.topic.as_str(),
                label.id.as_str()
            ),
            ("ns", "/tasks/exit", "c")
        );
        assert!(label.age() < Duration::from_secs(5));
        assert!(decode(&encode("", &bytes)).is_err());
    }
}
