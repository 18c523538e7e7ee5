//! The agent's clients on one thread: every connection is read as its bytes arrive, and a
//! request is handed to the agent as soon as it is whole, so a client that connects and says
//! nothing (or a slow one) holds up nobody; it gets an error once `CLIENT_TIMEOUT` passed.
//! Requests are still answered one at a time, in the order they became whole: the ledger
//! changes one request at a time.

use std::io::Read;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use crate::agent::wire::{MAX_FDS, MAX_REQUEST};
use crate::unix::FdReader;

/// How long a client has to send its whole request.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);

/// Connections read at once; one more is answered at once that the agent is busy. A host's
/// VMMs each hold one only while they ask something.
pub const MAX_CLIENTS: usize = 256;

/// A connection whose request is not whole yet.
struct Client {
    stream: UnixStream,
    line: Vec<u8>,
    fds: Vec<OwnedFd>,
    since: Instant,
}

/// A connection with something to answer: its whole request and the fds that came with it,
/// or why there is none (the error to send back).
pub struct Asked {
    pub stream: UnixStream,
    pub request: Result<(Vec<u8>, Vec<OwnedFd>), String>,
}

/// The listening socket and the connections being read.
pub struct Clients {
    listener: UnixListener,
    open: Vec<Client>,
}

impl Clients {
    /// Serves `listener`, which is made non-blocking.
    pub fn new(listener: UnixListener) -> std::io::Result<Clients> {
        listener.set_nonblocking(true)?;
        Ok(Clients {
            listener,
            open: Vec::new(),
        })
    }

    /// Waits until some connection has something to answer, or `until` passed (`None`: no
    /// limit but the clients' own); returns those connections, in the order their requests
    /// became whole. Each is back in blocking mode, for the reply.
    pub fn wait(&mut self, until: Option<Duration>) -> Vec<Asked> {
        let now = Instant::now();
        let earliest = self
            .open
            .iter()
            .map(|c| (c.since + CLIENT_TIMEOUT).saturating_duration_since(now))
            .min();
        let timeout = match (until, earliest) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let readable = self.poll(timeout);
        let mut asked = Vec::new();
        if readable.first().copied().unwrap_or(false) {
            self.accept_all(&mut asked);
        }
        // The new connections were not polled: read them too (they may have written already).
        let mut still_open = Vec::with_capacity(self.open.len());
        for (index, mut client) in std::mem::take(&mut self.open).into_iter().enumerate() {
            let polled = readable.get(index + 1).copied().unwrap_or(true);
            let outcome = if polled {
                read(&mut client)
            } else {
                Progress::Partial
            };
            match outcome {
                Progress::Partial if client.since.elapsed() >= CLIENT_TIMEOUT => {
                    asked.push(Asked {
                        stream: client.stream,
                        request: Err(format!(
                            "no whole request within {} s",
                            CLIENT_TIMEOUT.as_secs()
                        )),
                    })
                }
                Progress::Partial => still_open.push(client),
                Progress::Whole => asked.push(Asked {
                    stream: client.stream,
                    request: Ok((client.line, client.fds)),
                }),
                Progress::Failed(why) => asked.push(Asked {
                    stream: client.stream,
                    request: Err(why),
                }),
            }
        }
        self.open = still_open;
        for a in &asked {
            let _ = a.stream.set_nonblocking(false);
            let _ = a.stream.set_write_timeout(Some(CLIENT_TIMEOUT));
        }
        asked
    }

    /// Readiness of the listener, then of each open connection. A failed poll (for want of
    /// kernel memory, or a signal) reports everything readable: reads that find nothing just
    /// wait for the next turn.
    fn poll(&self, timeout: Option<Duration>) -> Vec<bool> {
        let mut fds = vec![PollFd::new(self.listener.as_fd(), PollFlags::POLLIN)];
        fds.extend(
            self.open
                .iter()
                .map(|c| PollFd::new(c.stream.as_fd(), PollFlags::POLLIN)),
        );
        let timeout = match timeout {
            None => PollTimeout::NONE,
            Some(t) => {
                PollTimeout::try_from(t.as_nanos().div_ceil(1_000_000)).unwrap_or(PollTimeout::MAX)
            }
        };
        match poll(&mut fds, timeout) {
            Ok(_) => fds
                .iter()
                .map(|fd| fd.revents().is_some_and(|r| !r.is_empty()))
                .collect(),
            Err(Errno::EINTR) => vec![false; fds.len()],
            Err(e) => {
                log::warn!("agent: waiting for clients: {e}");
                vec![true; fds.len()]
            }
        }
    }

    /// Takes every waiting connection; one past `MAX_CLIENTS` is answered at once.
    fn accept_all(&mut self, asked: &mut Vec<Asked>) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if self.open.len() >= MAX_CLIENTS {
                        asked.push(Asked {
                            stream,
                            request: Err(format!(
                                "the agent is reading {MAX_CLIENTS} other requests: try again"
                            )),
                        });
                    } else if let Err(e) = stream.set_nonblocking(true) {
                        log::warn!("agent: a client's socket: {e}");
                    } else {
                        self.open.push(Client {
                            stream,
                            line: Vec::new(),
                            fds: Vec::new(),
                            since: Instant::now(),
                        });
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    log::warn!("agent: accept: {e}");
                    return;
                }
            }
        }
    }
}

/// How far a connection's request is.
enum Progress {
    Partial,
    Whole,
    Failed(String),
}

/// Reads what `client` sent so far, up to its newline.
fn read(client: &mut Client) -> Progress {
    let mut reader = FdReader::<MAX_FDS>::new(&client.stream);
    let mut chunk = [0u8; 16 * 1024];
    let outcome = loop {
        match reader.read(&mut chunk) {
            Ok(0) => {
                break Progress::Failed("the client closed before its request was whole".into())
            }
            Ok(n) => {
                let searched = client.line.len();
                client.line.extend_from_slice(&chunk[..n]);
                if let Some(end) = client.line[searched..].iter().position(|&b| b == b'\n') {
                    client.line.truncate(searched + end);
                    break Progress::Whole;
                }
                if client.line.len() > MAX_REQUEST {
                    break Progress::Failed(format!("a request longer than {MAX_REQUEST} bytes"));
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break Progress::Partial,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => break Progress::Failed(format!("cannot read the request: {e}")),
        }
    };
    client.fds.extend(reader.into_fds());
    if client.fds.len() > MAX_FDS {
        return Progress::Failed(format!("more than {MAX_FDS} fds with one request"));
    }
    outcome
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;
    use crate::agent::server::bind_socket;

    fn listener(name: &str) -> (UnixListener, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!("luvmm-clients-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("agent.sock");
        (bind_socket(&path).unwrap(), path)
    }

    /// Waits for whatever is asked, for at most `limit`.
    fn asked_within(clients: &mut Clients, limit: Duration) -> Vec<Asked> {
        let start = Instant::now();
        let mut all = Vec::new();
        while all.is_empty() && start.elapsed() < limit {
            all.extend(clients.wait(Some(Duration::from_millis(100))));
        }
        all
    }

    #[test]
    fn idle_clients_hold_up_nobody_and_are_answered_at_their_timeout() {
        let (listener, path) = listener("idle");
        let mut clients = Clients::new(listener).unwrap();
        let idle: Vec<UnixStream> = (0..20)
            .map(|_| UnixStream::connect(&path).unwrap())
            .collect();
        let mut asking = UnixStream::connect(&path).unwrap();
        // A request sent in two pieces, the second after the agent has looked.
        asking.write_all(br#"{"op":"sta"#).unwrap();
        assert!(clients.wait(Some(Duration::from_millis(50))).is_empty());
        asking.write_all(b"tus\"}\n").unwrap();
        let start = Instant::now();
        let asked = asked_within(&mut clients, Duration::from_secs(2));
        assert!(
            start.elapsed() < Duration::from_secs(1),
            "{:?}",
            start.elapsed()
        );
        assert_eq!(asked.len(), 1);
        let (line, fds) = asked[0].request.as_ref().expect("a whole request");
        assert_eq!(line, br#"{"op":"status"}"#);
        assert!(fds.is_empty());
        // The idle ones are answered, each with why, once their time is up.
        let mut timed_out = 0;
        let deadline = Instant::now() + CLIENT_TIMEOUT + Duration::from_secs(2);
        while timed_out < idle.len() && Instant::now() < deadline {
            for a in clients.wait(Some(Duration::from_millis(200))) {
                let why = a.request.err().unwrap_or_default();
                assert!(why.contains("no whole request within 5 s"), "{why}");
                timed_out += 1;
            }
        }
        assert_eq!(timed_out, idle.len());
    }

    #[test]
    fn a_request_too_long_or_cut_short_is_refused() {
        let (listener, path) = listener("bad");
        let mut clients = Clients::new(listener).unwrap();
        let mut long = UnixStream::connect(&path).unwrap();
        let sender = std::thread::spawn(move || {
            let _ = long.write_all(&vec![b'x'; MAX_REQUEST + 1024]);
            long
        });
        let asked = asked_within(&mut clients, Duration::from_secs(5));
        let why = asked.into_iter().next().and_then(|a| a.request.err());
        assert!(why.is_some_and(|w| w.contains("longer than")));
        drop(sender.join());
        let mut cut = UnixStream::connect(&path).unwrap();
        cut.write_all(br#"{"op":"#).unwrap();
        drop(cut);
        let asked = asked_within(&mut clients, Duration::from_secs(2));
        let why = asked.into_iter().next().and_then(|a| a.request.err());
        assert!(why.is_some_and(|w| w.contains("closed before")));
    }
}
