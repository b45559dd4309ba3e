//! The host's end of the agent channel: calls matched to answers by id,
//! process output written where containerd reads it, container events
//! routed to their tasks. When the channel ends (the VM died), every call
//! waiting is answered and every live process is reported exited (137).

use std::collections::{HashMap, HashSet};
use std::os::fd::OwnedFd;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kuasar_agent_api::{
    self as api, event, frame, read_frame, request, response, write_frame, Frame, FrameError,
};
use kuasar_core::backend::{ContainerEvent, EventSink};
use kuasar_core::error::{Error, Result};
use kuasar_host::stdio::FdStream;
use kuasar_protocol::Code;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};

/// What a successor daemon needs of the host's end of a channel.
#[derive(serde::Serialize, serde::Deserialize, Debug, Default, Clone)]
pub struct AgentRecord {
    pub next_id: u64,
    pub next_stream: u64,
    /// Output streams, in the order of the handed-over descriptors.
    pub outputs: Vec<u64>,
    /// Live processes by container: exec ids, "" for the init process.
    pub live: HashMap<String, Vec<String>>,
}

/// The status containerd reports for a process whose VM died: SIGKILL.
pub const KILLED: u32 = 128 + 9;

/// Events held for one container until its task is taken over.
const MAX_UNROUTED: usize = 64;

type Reply = std::result::Result<response::Result, api::Status>;

#[derive(Default)]
struct State {
    pending: HashMap<u64, oneshot::Sender<Reply>>,
    /// Where each output stream goes, with a duplicate of its descriptor
    /// for a live upgrade.
    outputs: HashMap<u64, (mpsc::UnboundedSender<Vec<u8>>, OwnedFd)>,
    events: HashMap<String, EventSink>,
    /// Events of containers no sink is registered for yet (a successor
    /// daemon between taking over the VM and its tasks).
    unrouted: HashMap<String, Vec<ContainerEvent>>,
    /// Processes that exist in the guest, by container: exec ids, "" for
    /// the init process.
    live: HashMap<String, HashSet<String>>,
    /// Why the channel ended, once it has.
    dead: Option<String>,
}

pub struct Agent {
    /// A duplicate of the channel, for a live upgrade.
    channel: OwnedFd,
    tx: mpsc::UnboundedSender<Frame>,
    state: Mutex<State>,
    next_id: AtomicU64,
    next_stream: AtomicU64,
    /// What the VM's console said last, for errors (set by the owner).
    describe: Mutex<Option<Box<dyn Fn() -> String + Send + Sync>>>,
}

impl Agent {
    /// Serves the channel on `fd` (the host end of the VM's port).
    pub fn connect(fd: OwnedFd) -> Result<Arc<Agent>> {
        let read_fd = fd.try_clone().map_err(kuasar_core::error::io_context(
            "duplicating the agent channel",
        ))?;
        let channel = fd.try_clone().map_err(kuasar_core::error::io_context(
            "duplicating the agent channel",
        ))?;
        let mut reader = FdStream::new(read_fd)
            .map_err(kuasar_core::error::io_context("watching the agent channel"))?;
        let mut writer = FdStream::new(fd)
            .map_err(kuasar_core::error::io_context("watching the agent channel"))?;
        let (tx, mut rx) = mpsc::unbounded_channel::<Frame>();
        let agent = Arc::new(Agent {
            channel,
            tx,
            state: Mutex::default(),
            next_id: AtomicU64::new(1),
            next_stream: AtomicU64::new(1),
            describe: Mutex::new(None),
        });
        tokio::spawn(async move {
            while let Some(f) = rx.recv().await {
                if let Err(e) = write_frame(&mut writer, &f).await {
                    tracing::debug!("agent channel write: {e}");
                    break;
                }
            }
        });
        let weak = Arc::downgrade(&agent);
        tokio::spawn(async move {
            let reason = loop {
                let f = read_frame(&mut reader).await;
                let Some(agent) = weak.upgrade() else { return };
                match f {
                    Ok(f) => agent.receive(f),
                    Err(FrameError::Closed) => break "the VM closed the agent channel".to_string(),
                    Err(e) => break format!("the agent channel failed: {e}"),
                }
            };
            if let Some(agent) = weak.upgrade() {
                agent.die(reason);
            }
        });
        Ok(agent)
    }

    /// What a successor needs to serve the channel on: counters, the live
    /// processes, and duplicates of the channel and of the output streams'
    /// descriptors (in that order). Call once the agent holds its output.
    pub fn export(&self) -> Result<(AgentRecord, Vec<OwnedFd>)> {
        let st = self.state.lock().unwrap();
        let mut fds = vec![self
            .channel
            .try_clone()
            .map_err(kuasar_core::error::io_context(
                "duplicating the agent channel",
            ))?];
        let mut outputs = Vec::new();
        for (sid, (_, fd)) in &st.outputs {
            fds.push(fd.try_clone().map_err(kuasar_core::error::io_context(
                "duplicating a process output",
            ))?);
            outputs.push(*sid);
        }
        Ok((
            AgentRecord {
                next_id: self.next_id.load(Ordering::Relaxed),
                next_stream: self.next_stream.load(Ordering::Relaxed),
                outputs,
                live: st
                    .live
                    .iter()
                    .map(|(id, execs)| (id.clone(), execs.iter().cloned().collect()))
                    .collect(),
            },
            fds,
        ))
    }

    /// Serves a channel a predecessor handed over (`fd`); `outputs` are the
    /// descriptors of `record.outputs`, in order.
    pub fn adopt(fd: OwnedFd, record: &AgentRecord, outputs: Vec<OwnedFd>) -> Result<Arc<Agent>> {
        let agent = Agent::connect(fd)?;
        agent.next_id.store(record.next_id, Ordering::Relaxed);
        agent
            .next_stream
            .store(record.next_stream, Ordering::Relaxed);
        for (sid, fd) in record.outputs.iter().zip(outputs) {
            agent.add_output(*sid, fd)?;
        }
        agent.state.lock().unwrap().live = record
            .live
            .iter()
            .map(|(id, execs)| (id.clone(), execs.iter().cloned().collect()))
            .collect();
        Ok(agent)
    }

    /// Sets what is added to errors of a VM that is gone or does not answer
    /// (its console tail).
    pub fn describe_with(&self, describe: impl Fn() -> String + Send + Sync + 'static) {
        *self.describe.lock().unwrap() = Some(Box::new(describe));
    }

    fn describe_vm(&self) -> Option<String> {
        self.describe
            .lock()
            .unwrap()
            .as_ref()
            .map(|describe| describe())
    }

    pub fn stream_id(&self) -> u64 {
        self.next_stream.fetch_add(1, Ordering::Relaxed)
    }

    pub fn is_dead(&self) -> bool {
        self.state.lock().unwrap().dead.is_some()
    }

    fn dead_error(&self, reason: &str) -> Error {
        Error::Unavailable(format!("the sandbox VM is gone: {reason}"))
    }

    /// Sends a call and waits for its answer, at most `timeout`.
    pub async fn call(&self, call: request::Call, timeout: Duration) -> Result<response::Result> {
        let started = std::time::Instant::now();
        // The variant's name, without its (possibly large) content.
        let name = tracing::enabled!(tracing::Level::DEBUG).then(|| {
            let text = format!("{call:?}");
            text.split(['(', ' '])
                .next()
                .unwrap_or_default()
                .to_string()
        });
        let result = self.call_inner(call, timeout).await;
        if let Some(name) = name {
            let took_us = started.elapsed().as_micros() as u64;
            match &result {
                Ok(_) => tracing::debug!(call = %name, took_us, "agent call"),
                Err(e) => tracing::debug!(call = %name, took_us, error = %e, "agent call failed"),
            }
        }
        result
    }

    async fn call_inner(&self, call: request::Call, timeout: Duration) -> Result<response::Result> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        {
            let mut st = self.state.lock().unwrap();
            if let Some(reason) = &st.dead {
                return Err(self.dead_error(reason));
            }
            st.pending.insert(id, tx);
        }
        let _ = self.tx.send(Frame::request(id, call));
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(Ok(r))) => Ok(r),
            Ok(Ok(Err(s))) => Err(Error::from_code(Code::from_i32(s.code as i32), s.message)),
            Ok(Err(_)) => {
                let reason = self.state.lock().unwrap().dead.clone().unwrap_or_default();
                Err(self.dead_error(&reason))
            }
            Err(_) => {
                self.state.lock().unwrap().pending.remove(&id);
                let console = self.describe_vm().unwrap_or_default();
                Err(Error::DeadlineExceeded(format!(
                    "the guest agent did not answer within {timeout:?}; {console}"
                )))
            }
        }
    }

    /// Sends stdin bytes (or its end) for stream `sid`.
    pub fn input(&self, sid: u64, data: Vec<u8>, eof: bool) {
        let _ = self.tx.send(Frame::input(sid, data, eof));
    }

    /// Writes what the guest sends on stream `sid` into `to`, closing it at
    /// the stream's end.
    pub fn add_output(&self, sid: u64, to: OwnedFd) -> Result<()> {
        let dup = to.try_clone().map_err(kuasar_core::error::io_context(
            "duplicating a process output",
        ))?;
        let mut w: Pin<Box<dyn AsyncWrite + Send + Sync>> = kuasar_host::stdio::writer(to)
            .map_err(kuasar_core::error::io_context("watching a process output"))?;
        let (tx, mut rx) = mpsc::unbounded_channel::<Vec<u8>>();
        tokio::spawn(async move {
            while let Some(chunk) = rx.recv().await {
                if w.write_all(&chunk).await.is_err() {
                    // The reader went away: drop what follows, as a shim does.
                    while rx.recv().await.is_some() {}
                    break;
                }
            }
            let _ = w.shutdown().await;
        });
        let mut st = self.state.lock().unwrap();
        if st.dead.is_none() {
            st.outputs.insert(sid, (tx, dup));
        }
        Ok(())
    }

    pub fn drop_output(&self, sid: u64) {
        self.state.lock().unwrap().outputs.remove(&sid);
    }

    /// Routes a container's events to `sink`.
    pub fn add_container(&self, id: &str, sink: EventSink) {
        let mut st = self.state.lock().unwrap();
        for ev in st.unrouted.remove(id).unwrap_or_default() {
            let _ = sink.send(ev);
        }
        st.events.insert(id.to_string(), sink);
    }

    pub fn remove_container(&self, id: &str) {
        let mut st = self.state.lock().unwrap();
        st.events.remove(id);
        st.live.remove(id);
    }

    /// Records that a process exists in the guest (after Create or Exec).
    pub fn process_started(&self, id: &str, exec_id: &str) {
        let mut st = self.state.lock().unwrap();
        if st.dead.is_some() {
            drop(st);
            // The VM died while the call was answered: report it now.
            self.report_exit(id, exec_id, KILLED);
            return;
        }
        st.live
            .entry(id.to_string())
            .or_default()
            .insert(exec_id.to_string());
    }

    fn report_exit(&self, id: &str, exec_id: &str, status: u32) {
        let exec = (!exec_id.is_empty()).then(|| exec_id.to_string());
        self.route(id, ContainerEvent::Exit(exec, status));
    }

    fn route(&self, id: &str, ev: ContainerEvent) {
        let mut st = self.state.lock().unwrap();
        if let Some(sink) = st.events.get(id) {
            let _ = sink.send(ev);
            return;
        }
        // Held only for a container the host knows (its task not yet
        // taken over) or reported by the host itself once the VM is gone:
        // a guest cannot fill the daemon with events of made-up ids.
        if st.dead.is_none() && !st.live.contains_key(id) {
            tracing::debug!(container = id, "dropped an event of an unknown container");
            return;
        }
        let held = st.unrouted.entry(id.to_string()).or_default();
        if held.len() < MAX_UNROUTED {
            held.push(ev);
        }
    }

    fn receive(&self, f: Frame) {
        match f.body {
            Some(frame::Body::Response(r)) => {
                let tx = self.state.lock().unwrap().pending.remove(&r.id);
                let reply = match (r.error, r.result) {
                    (Some(e), _) => Err(e),
                    (None, Some(ok)) => Ok(ok),
                    (None, None) => Err(api::Status::new(
                        api::code::INTERNAL,
                        "the guest agent answered with nothing",
                    )),
                };
                if let Some(tx) = tx {
                    let _ = tx.send(reply);
                }
            }
            Some(frame::Body::Output(o)) => {
                let mut st = self.state.lock().unwrap();
                if let Some((w, _)) = st.outputs.get(&o.stream) {
                    if !o.data.is_empty() {
                        let _ = w.send(o.data);
                    }
                }
                if o.eof {
                    st.outputs.remove(&o.stream);
                }
            }
            Some(frame::Body::Event(e)) => match e.kind {
                Some(event::Kind::Exit(x)) => {
                    let known = self
                        .state
                        .lock()
                        .unwrap()
                        .live
                        .get_mut(&e.id)
                        .map(|l| l.remove(&x.exec_id))
                        .unwrap_or(false);
                    if known {
                        self.report_exit(&e.id, &x.exec_id, x.status);
                    }
                }
                Some(event::Kind::Oom(_)) => self.route(&e.id, ContainerEvent::Oom),
                None => {}
            },
            other => tracing::warn!("unexpected frame from the guest agent: {other:?}"),
        }
    }

    /// The channel ended: answers every waiting call and reports every
    /// live process killed.
    pub fn die(&self, reason: String) {
        let reason = match self.describe_vm() {
            Some(vm) => format!("{reason}; {vm}"),
            None => reason,
        };
        let (pending, live) = {
            let mut st = self.state.lock().unwrap();
            if st.dead.is_some() {
                return;
            }
            tracing::warn!("{reason}");
            st.dead = Some(reason);
            st.outputs.clear();
            (
                std::mem::take(&mut st.pending),
                std::mem::take(&mut st.live),
            )
        };
        drop(pending); // each waiter sees its sender dropped
        for (id, execs) in live {
            for exec_id in execs {
                self.report_exit(&id, &exec_id, KILLED);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kuasar_agent_api::{encode_frame, Frame};
    use std::os::unix::net::UnixStream;
    use tokio::io::AsyncWriteExt;

    /// An agent client and the guest's end of its channel.
    fn pair() -> (Arc<Agent>, tokio::net::UnixStream) {
        let (host, guest) = UnixStream::pair().unwrap();
        guest.set_nonblocking(true).unwrap();
        (
            Agent::connect(host.into()).unwrap(),
            tokio::net::UnixStream::from_std(guest).unwrap(),
        )
    }

    fn start(id: &str) -> request::Call {
        request::Call::Start(api::ContainerRef { id: id.into() })
    }

    async fn next_request(guest: &mut tokio::net::UnixStream) -> api::Request {
        match read_frame(guest).await.unwrap().body {
            Some(frame::Body::Request(r)) => r,
            other => panic!("expected a request, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn answers_are_matched_by_id_in_any_order() {
        let (agent, mut guest) = pair();
        let (a1, a2) = (agent.clone(), agent.clone());
        let c1 = tokio::spawn(async move { a1.call(start("one"), Duration::from_secs(5)).await });
        let r1 = next_request(&mut guest).await;
        let c2 = tokio::spawn(async move { a2.call(start("two"), Duration::from_secs(5)).await });
        let r2 = next_request(&mut guest).await;
        write_frame(
            &mut guest,
            &Frame::response(r2.id, Ok(response::Result::Pid(2))),
        )
        .await
        .unwrap();
        write_frame(
            &mut guest,
            &Frame::response(r1.id, Err(api::Status::new(api::code::NOT_FOUND, "no one"))),
        )
        .await
        .unwrap();
        assert!(matches!(c2.await.unwrap(), Ok(response::Result::Pid(2))));
        assert!(matches!(c1.await.unwrap(), Err(Error::NotFound(m)) if m == "no one"));
    }

    #[tokio::test]
    async fn a_hanging_agent_is_a_deadline_with_the_console_and_the_channel_serves_on() {
        let (agent, mut guest) = pair();
        agent.describe_with(|| "console: stuck".into());
        let e = agent
            .call(start("c"), Duration::from_millis(100))
            .await
            .unwrap_err();
        assert!(
            matches!(&e, Error::DeadlineExceeded(m) if m.contains("console: stuck")),
            "{e}"
        );
        let late = next_request(&mut guest).await;
        // A late answer is dropped; the next call is answered.
        write_frame(
            &mut guest,
            &Frame::response(late.id, Ok(response::Result::Pid(1))),
        )
        .await
        .unwrap();
        let a = agent.clone();
        let c = tokio::spawn(async move { a.call(start("c"), Duration::from_secs(5)).await });
        let r = next_request(&mut guest).await;
        write_frame(
            &mut guest,
            &Frame::response(r.id, Ok(response::Result::Pid(7))),
        )
        .await
        .unwrap();
        assert!(matches!(c.await.unwrap(), Ok(response::Result::Pid(7))));
    }

    #[tokio::test]
    async fn garbage_or_a_closed_channel_answers_every_call_and_ends_every_process() {
        for garbage in [true, false] {
            let (agent, mut guest) = pair();
            let (sink, mut events) = mpsc::unbounded_channel();
            agent.add_container("c", sink);
            agent.process_started("c", "");
            agent.process_started("c", "e1");
            let a = agent.clone();
            let c = tokio::spawn(async move { a.call(start("c"), Duration::from_secs(30)).await });
            let _ = next_request(&mut guest).await;
            if garbage {
                // A length far over the limit: the stream cannot be trusted.
                guest.write_all(&u32::MAX.to_be_bytes()).await.unwrap();
            } else {
                drop(guest);
            }
            let e = c.await.unwrap().unwrap_err();
            assert!(matches!(&e, Error::Unavailable(_)), "{e}");
            let mut exits = vec![events.recv().await.unwrap(), events.recv().await.unwrap()];
            exits.sort_by_key(|e| format!("{e:?}"));
            assert_eq!(
                exits,
                vec![
                    ContainerEvent::Exit(None, KILLED),
                    ContainerEvent::Exit(Some("e1".into()), KILLED)
                ]
            );
            // Later calls fail at once.
            let e = agent
                .call(start("c"), Duration::from_secs(30))
                .await
                .unwrap_err();
            assert!(matches!(&e, Error::Unavailable(_)), "{e}");
            assert!(agent.is_dead());
        }
    }

    #[tokio::test]
    async fn output_reaches_its_descriptor_and_an_exit_is_reported_once() {
        let (agent, mut guest) = pair();
        let (r, w) = kuasar_host::stdio::pipe().unwrap();
        agent.add_output(5, w).unwrap();
        let (sink, mut events) = mpsc::unbounded_channel();
        agent.add_container("c", sink);
        agent.process_started("c", "");
        for f in [
            Frame::output(5, b"hello ".to_vec(), false),
            Frame::output(5, b"vm".to_vec(), true),
            Frame::event(
                "c".into(),
                event::Kind::Exit(api::Exit {
                    exec_id: String::new(),
                    status: 3,
                }),
            ),
            // A second exit of the same process is not reported again.
            Frame::event(
                "c".into(),
                event::Kind::Exit(api::Exit {
                    exec_id: String::new(),
                    status: 4,
                }),
            ),
        ] {
            guest.write_all(&encode_frame(&f).unwrap()).await.unwrap();
        }
        assert_eq!(events.recv().await.unwrap(), ContainerEvent::Exit(None, 3));
        let mut out = String::new();
        let mut r = std::fs::File::from(r);
        std::io::Read::read_to_string(&mut r, &mut out).unwrap();
        assert_eq!(out, "hello vm");
        drop(guest);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            events.try_recv().is_err(),
            "an exited process is not reported killed"
        );
    }

    #[tokio::test]
    async fn a_guest_flooding_events_of_unknown_containers_cannot_grow_the_host() {
        let (agent, mut guest) = pair();
        // A container being taken over: known, its task not yet back.
        agent
            .state
            .lock()
            .unwrap()
            .live
            .insert("c".into(), Default::default());
        for i in 0..5000 {
            let id = if i % 2 == 0 {
                format!("made-up-{i}")
            } else {
                "c".into()
            };
            let f = Frame::event(id, event::Kind::Oom(api::Empty {}));
            guest.write_all(&encode_frame(&f).unwrap()).await.unwrap();
        }
        // The frames are read in order: once an answer to a later call is
        // in, every event before it was handled.
        let a = agent.clone();
        let c = tokio::spawn(async move { a.call(start("c"), Duration::from_secs(5)).await });
        let r = next_request(&mut guest).await;
        write_frame(
            &mut guest,
            &Frame::response(r.id, Ok(response::Result::Pid(1))),
        )
        .await
        .unwrap();
        c.await.unwrap().unwrap();
        {
            let st = agent.state.lock().unwrap();
            assert_eq!(st.unrouted.keys().collect::<Vec<_>>(), ["c"]);
            assert_eq!(st.unrouted["c"].len(), MAX_UNROUTED);
        }
        let (sink, mut events) = mpsc::unbounded_channel();
        agent.add_container("c", sink);
        for _ in 0..MAX_UNROUTED {
            assert_eq!(events.try_recv().unwrap(), ContainerEvent::Oom);
        }
        assert!(events.try_recv().is_err());
    }
}
