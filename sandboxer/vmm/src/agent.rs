//! The host's end of the agent channel: calls matched to answers by id,
//! process output written where containerd reads it, container events
//! routed to their tasks. When the channel ends (the VM died), every call
//! waiting is answered and every live process is reported exited (137).
//!
//! The channel and every output descriptor are parked in the holder while
//! they are in use, so that a daemon restarted after a crash serves the
//! same channel on ([`Agent::resume`], then [`Agent::resync`]) and
//! containerd's readers see no end of their streams.

use std::collections::{HashMap, HashSet};
use std::os::fd::OwnedFd;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kuasar_agent_api::{
    self as api, event, frame, request, response, write_frame, Frame, FrameError, FrameReader,
};
use kuasar_core::backend::{ContainerEvent, EventSink, Parking};
use kuasar_core::error::{Error, Result};
use kuasar_host::stdio::FdStream;
use kuasar_protocol::Code;
use std::os::fd::AsFd;
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

/// The channel's name in the sandbox's parking.
const PARKED_CHANNEL: &str = "agent";

fn parked_output(sid: u64) -> String {
    format!("out/{sid}")
}

/// Processes by container: exec ids, "" for the init process.
pub type Live = HashMap<String, HashSet<String>>;

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
    live: Live,
    /// Why the channel ended, once it has.
    dead: Option<String>,
}

pub struct Agent {
    /// A duplicate of the channel, for a live upgrade.
    channel: OwnedFd,
    parking: Parking,
    tx: mpsc::UnboundedSender<Frame>,
    state: Mutex<State>,
    next_id: AtomicU64,
    next_stream: AtomicU64,
    /// What the VM's console said last, for errors (set by the owner).
    describe: Mutex<Option<Box<dyn Fn() -> String + Send + Sync>>>,
}

impl Agent {
    /// Serves the channel on `fd` (the host end of the VM's port), parked
    /// in `parking` while it lives.
    pub fn connect(fd: OwnedFd, parking: Parking) -> Result<Arc<Agent>> {
        Agent::serve(fd, parking, State::default(), 1, 1)
    }

    /// Serves `fd` with `state` in place before the first frame is read.
    fn serve(
        fd: OwnedFd,
        parking: Parking,
        state: State,
        next_id: u64,
        next_stream: u64,
    ) -> Result<Arc<Agent>> {
        let dup = || {
            fd.try_clone().map_err(kuasar_core::error::io_context(
                "duplicating the agent channel",
            ))
        };
        let (read_fd, channel) = (dup()?, dup()?);
        parking.park(PARKED_CHANNEL, fd.as_fd());
        let mut reader = FrameReader::new(
            FdStream::new(read_fd)
                .map_err(kuasar_core::error::io_context("watching the agent channel"))?,
        );
        let mut writer = FdStream::new(fd)
            .map_err(kuasar_core::error::io_context("watching the agent channel"))?;
        let (tx, mut rx) = mpsc::unbounded_channel::<Frame>();
        let agent = Arc::new(Agent {
            channel,
            parking,
            tx,
            state: Mutex::new(state),
            next_id: AtomicU64::new(next_id),
            next_stream: AtomicU64::new(next_stream),
            describe: Mutex::new(None),
        });
        tokio::spawn(async move {
            // A predecessor that crashed may have left a frame unfinished:
            // the delimiter ends it (the agent drops it as malformed).
            if writer.write_all(&[api::DELIMITER]).await.is_err() {
                return;
            }
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
                let f = reader.next().await;
                let Some(agent) = weak.upgrade() else { return };
                match f {
                    Ok(f) => agent.receive(f),
                    // What a crashed predecessor left half-read, or garbage:
                    // the next frame is whole.
                    Err(e) if e.in_step() => tracing::warn!("dropped from the guest agent: {e}"),
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
    /// What a successor needs, without descriptors (written down for a
    /// restart after a crash: the descriptors are parked).
    pub fn record(&self) -> AgentRecord {
        let st = self.state.lock().unwrap();
        AgentRecord {
            next_id: self.next_id.load(Ordering::Relaxed),
            next_stream: self.next_stream.load(Ordering::Relaxed),
            outputs: st.outputs.keys().copied().collect(),
            live: st
                .live
                .iter()
                .map(|(id, execs)| (id.clone(), execs.iter().cloned().collect()))
                .collect(),
        }
    }

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
    pub fn adopt(
        fd: OwnedFd,
        record: &AgentRecord,
        outputs: Vec<OwnedFd>,
        parking: Parking,
    ) -> Result<Arc<Agent>> {
        let live = record
            .live
            .iter()
            .map(|(id, execs)| (id.clone(), execs.iter().cloned().collect()))
            .collect();
        let outputs = record.outputs.iter().copied().zip(outputs).collect();
        Agent::serve_with(
            fd,
            parking,
            outputs,
            live,
            record.next_id,
            record.next_stream,
        )
    }

    /// Serves the channel a crashed predecessor parked, with the output
    /// descriptors it parked and the processes it recorded as live. Call
    /// [`Agent::resync`] next. Ids of calls start past any the predecessor
    /// used, so that its late answers match nothing.
    pub fn resume(
        fd: OwnedFd,
        parking: Parking,
        outputs: Vec<(u64, OwnedFd)>,
        live: Live,
        next_stream: u64,
    ) -> Result<Arc<Agent>> {
        let micros = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_micros() as u64;
        Agent::serve_with(fd, parking, outputs, live, micros, next_stream)
    }

    fn serve_with(
        fd: OwnedFd,
        parking: Parking,
        outputs: Vec<(u64, OwnedFd)>,
        live: Live,
        next_id: u64,
        next_stream: u64,
    ) -> Result<Arc<Agent>> {
        let mut state = State {
            live,
            ..Default::default()
        };
        for (sid, fd) in outputs {
            parking.park(&parked_output(sid), fd.as_fd());
            state.outputs.insert(sid, output_writer(fd)?);
        }
        Agent::serve(fd, parking, state, next_id, next_stream)
    }

    /// After [`Agent::resume`]: asks the agent what it runs and ran,
    /// reports the exits the predecessor did not see (and, as lost, live
    /// processes the agent no longer knows), and returns the agent's
    /// processes for the caller to match with what it recorded.
    pub async fn resync(&self, timeout: Duration) -> Result<Vec<api::Process>> {
        let answer = self
            .call(request::Call::Resync(api::Empty {}), timeout)
            .await?;
        let response::Result::Processes(all) = answer else {
            return Err(Error::Internal(format!(
                "the guest agent answered Resync with {answer:?}"
            )));
        };
        self.next_stream
            .fetch_max(all.max_stream.saturating_add(1), Ordering::Relaxed);
        let ended: Vec<(String, String, u32)> = {
            let mut st = self.state.lock().unwrap();
            let mut ended = Vec::new();
            for (id, execs) in st.live.iter_mut() {
                execs.retain(|exec_id| {
                    let found = all
                        .processes
                        .iter()
                        .find(|p| p.id == *id && p.exec_id == *exec_id);
                    match found {
                        Some(p) if !p.exited => true,
                        Some(p) => {
                            ended.push((id.clone(), exec_id.clone(), p.status));
                            false
                        }
                        None => {
                            ended.push((
                                id.clone(),
                                exec_id.clone(),
                                kuasar_core::task::LOST_EXIT_STATUS,
                            ));
                            false
                        }
                    }
                });
            }
            ended
        };
        for (id, exec_id, status) in ended {
            self.report_exit(&id, &exec_id, status);
        }
        Ok(all.processes)
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
        let writer = output_writer(to)?;
        let mut st = self.state.lock().unwrap();
        if st.dead.is_none() {
            self.parking.park(&parked_output(sid), writer.1.as_fd());
            st.outputs.insert(sid, writer);
        }
        Ok(())
    }

    pub fn drop_output(&self, sid: u64) {
        if self.state.lock().unwrap().outputs.remove(&sid).is_some() {
            self.parking.unpark(&parked_output(sid));
        }
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
                if o.eof && st.outputs.remove(&o.stream).is_some() {
                    self.parking.unpark(&parked_output(o.stream));
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
            for sid in st.outputs.keys() {
                self.parking.unpark(&parked_output(*sid));
            }
            self.parking.unpark(PARKED_CHANNEL);
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

type OutputWriter = (mpsc::UnboundedSender<Vec<u8>>, OwnedFd);

/// A copy into `to` fed through the returned sender, and a duplicate of
/// `to` (for a live upgrade and the parking).
fn output_writer(to: OwnedFd) -> Result<OutputWriter> {
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
    Ok((tx, dup))
}

#[cfg(test)]
mod tests {
    use super::*;
    use kuasar_agent_api::{encode_frame, Frame};
    use std::os::unix::net::UnixStream;
    use tokio::io::AsyncWriteExt;

    /// The guest's end of a channel.
    struct Guest {
        r: FrameReader<tokio::net::unix::OwnedReadHalf>,
        w: tokio::net::unix::OwnedWriteHalf,
    }

    fn guest_end(guest: UnixStream) -> Guest {
        guest.set_nonblocking(true).unwrap();
        let (r, w) = tokio::net::UnixStream::from_std(guest)
            .unwrap()
            .into_split();
        Guest {
            r: FrameReader::new(r),
            w,
        }
    }

    /// An agent client and the guest's end of its channel.
    fn pair() -> (Arc<Agent>, Guest) {
        let (host, guest) = UnixStream::pair().unwrap();
        (
            Agent::connect(host.into(), Parking::default()).unwrap(),
            guest_end(guest),
        )
    }

    fn start(id: &str) -> request::Call {
        request::Call::Start(api::ContainerRef { id: id.into() })
    }

    async fn next_request(guest: &mut Guest) -> api::Request {
        match guest.r.next().await.unwrap().body {
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
            &mut guest.w,
            &Frame::response(r2.id, Ok(response::Result::Pid(2))),
        )
        .await
        .unwrap();
        write_frame(
            &mut guest.w,
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
            &mut guest.w,
            &Frame::response(late.id, Ok(response::Result::Pid(1))),
        )
        .await
        .unwrap();
        let a = agent.clone();
        let c = tokio::spawn(async move { a.call(start("c"), Duration::from_secs(5)).await });
        let r = next_request(&mut guest).await;
        write_frame(
            &mut guest.w,
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
                // Garbage is dropped (the next frame would be whole); the
                // channel then ends.
                guest.w.write_all(&[0xff, 0x13, 0]).await.unwrap();
            }
            drop(guest);
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
            guest.w.write_all(&encode_frame(&f).unwrap()).await.unwrap();
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
            guest.w.write_all(&encode_frame(&f).unwrap()).await.unwrap();
        }
        // The frames are read in order: once an answer to a later call is
        // in, every event before it was handled.
        let a = agent.clone();
        let c = tokio::spawn(async move { a.call(start("c"), Duration::from_secs(5)).await });
        let r = next_request(&mut guest).await;
        write_frame(
            &mut guest.w,
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

    #[tokio::test]
    async fn a_resumed_channel_resyncs_exits_outputs_and_stream_ids_with_the_agent() {
        let (host, guest) = UnixStream::pair().unwrap();
        let mut guest = guest_end(guest);
        // The crashed predecessor left half a frame on the way in.
        let cut = encode_frame(&Frame::output(5, b"lost".to_vec(), false)).unwrap();
        guest.w.write_all(&cut[..cut.len() / 2]).await.unwrap();
        let (r, w) = kuasar_host::stdio::pipe().unwrap();
        let live: Live = HashMap::from([(
            "c".to_string(),
            HashSet::from(["".to_string(), "e1".to_string(), "e2".to_string()]),
        )]);
        let agent = Agent::resume(host.into(), Parking::default(), vec![(5, w)], live, 7).unwrap();
        let (sink, mut events) = mpsc::unbounded_channel();
        agent.add_container("c", sink);
        let a = agent.clone();
        let resynced = tokio::spawn(async move { a.resync(Duration::from_secs(5)).await });
        let req = next_request(&mut guest).await;
        assert!(
            matches!(req.call, Some(request::Call::Resync(_))),
            "{req:?}"
        );
        assert!(
            req.id > 1 << 40,
            "ids start past the predecessor's: {}",
            req.id
        );
        let process = |id: &str, exec_id: &str, exited: bool, status: u32| api::Process {
            id: id.into(),
            exec_id: exec_id.into(),
            pid: 10,
            exited,
            status,
        };
        // The delimiter ended the cut frame: this one arrives whole.
        guest.w.write_all(&[0]).await.unwrap();
        write_frame(&mut guest.w, &Frame::output(5, b"kept".to_vec(), true))
            .await
            .unwrap();
        write_frame(
            &mut guest.w,
            &Frame::response(
                req.id,
                Ok(response::Result::Processes(api::Processes {
                    processes: vec![
                        process("c", "", false, 0),
                        process("c", "e1", true, 3),
                        process("x", "", false, 0),
                    ],
                    max_stream: 40,
                })),
            ),
        )
        .await
        .unwrap();
        let agent_has = resynced.await.unwrap().unwrap();
        assert_eq!(agent_has.len(), 3);
        let mut exits = vec![events.recv().await.unwrap(), events.recv().await.unwrap()];
        exits.sort_by_key(|e| format!("{e:?}"));
        assert_eq!(
            exits,
            vec![
                ContainerEvent::Exit(Some("e1".into()), 3),
                ContainerEvent::Exit(Some("e2".into()), kuasar_core::task::LOST_EXIT_STATUS),
            ]
        );
        assert_eq!(agent.stream_id(), 41);
        let mut out = String::new();
        std::io::Read::read_to_string(&mut std::fs::File::from(r), &mut out).unwrap();
        assert_eq!(out, "kept");
        // The init process is still live: a later exit is reported once.
        write_frame(
            &mut guest.w,
            &Frame::event(
                "c".into(),
                event::Kind::Exit(api::Exit {
                    exec_id: String::new(),
                    status: 0,
                }),
            ),
        )
        .await
        .unwrap();
        assert_eq!(events.recv().await.unwrap(), ContainerEvent::Exit(None, 0));
    }
}
