//! Sockets: one UDP socket per worker on a shared port (SO_REUSEPORT),
//! batched receive (`recvmmsg`) and send (`sendmmsg`), and an eventfd that
//! wakes a worker blocked in `poll` when a command arrives.

use std::io::{self, IoSlice, IoSliceMut};
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::{AsFd, AsRawFd};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::eventfd::{EfdFlags, EventFd};
use nix::sys::socket::{
    ControlMessageOwned, MsgFlags, MultiHeaders, SockaddrStorage, recvmmsg, sendmmsg, setsockopt,
    sockopt,
};
use nix::sys::time::TimeSpec;
use socket2::{Domain, Protocol, Socket, Type};

/// Largest datagram accepted.
pub const MAX_DATAGRAM: usize = 1500;
/// Datagrams per `recvmmsg`/`sendmmsg` call.
pub const BATCH: usize = 32;

/// Binds a non-blocking UDP socket with SO_REUSEPORT. The kernel stamps
/// each datagram's arrival (SO_TIMESTAMPNS), which [`RecvBatch`] reports.
pub fn bind_reuseport(addr: SocketAddr) -> io::Result<UdpSocket> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    // Room for bursts of a large call between two loop iterations.
    let _ = socket.set_recv_buffer_size(8 << 20);
    let _ = socket.set_send_buffer_size(8 << 20);
    socket.set_nonblocking(true)?;
    // Without arrival stamps the transit metric falls back to the time
    // `recvmmsg` returned; nothing else depends on them.
    let _ = setsockopt(&socket, sockopt::ReceiveTimestampns, &true);
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

/// The wall-clock time now, as the kernel stamps arrivals (CLOCK_REALTIME).
pub fn wall_now() -> Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
}

/// Reusable receive buffers for one worker.
#[derive(Debug)]
pub struct RecvBatch {
    bufs: Vec<[u8; MAX_DATAGRAM]>,
    headers: MultiHeaders<SockaddrStorage>,
    /// Per datagram of the last [`RecvBatch::recv`]: sender, length, arrival.
    meta: Vec<(Option<SocketAddr>, usize, Duration)>,
}

impl Default for RecvBatch {
    fn default() -> Self {
        Self {
            bufs: vec![[0u8; MAX_DATAGRAM]; BATCH],
            headers: MultiHeaders::preallocate(BATCH, Some(nix::cmsg_space!(TimeSpec))),
            meta: Vec::with_capacity(BATCH),
        }
    }
}

impl RecvBatch {
    /// Receives up to [`BATCH`] datagrams without blocking; [`RecvBatch::get`]
    /// then hands them out. Returns how many were received (0 when none are
    /// waiting).
    pub fn recv(&mut self, socket: &UdpSocket) -> io::Result<usize> {
        self.meta.clear();
        let mut slices: Vec<[IoSliceMut<'_>; 1]> = self
            .bufs
            .iter_mut()
            .map(|b| [IoSliceMut::new(&mut b[..])])
            .collect();
        let results = match recvmmsg(
            socket.as_raw_fd(),
            &mut self.headers,
            slices.iter_mut(),
            MsgFlags::MSG_DONTWAIT,
            None,
        ) {
            Ok(r) => r,
            Err(nix::errno::Errno::EAGAIN) => return Ok(0),
            Err(e) => return Err(e.into()),
        };
        let received = wall_now();
        for msg in results {
            let addr = msg.address.and_then(|a: SockaddrStorage| to_std(&a));
            let arrival = msg
                .cmsgs()
                .ok()
                .and_then(|mut c| {
                    c.find_map(|m| match m {
                        ControlMessageOwned::ScmTimestampns(ts) => Some(Duration::from(ts)),
                        _ => None,
                    })
                })
                .unwrap_or(received);
            self.meta.push((addr, msg.bytes, arrival));
        }
        Ok(self.meta.len())
    }

    /// Datagram `i` of the last receive: its sender, its bytes, and its
    /// arrival time (wall clock, see [`wall_now`]). `None` past the end or
    /// for a sender address that is not IP.
    pub fn get(&self, i: usize) -> Option<(SocketAddr, &[u8], Duration)> {
        let (addr, len, arrival) = *self.meta.get(i)?;
        let buf = self.bufs.get(i)?;
        Some((addr?, &buf[..len.min(MAX_DATAGRAM)], arrival))
    }
}

fn to_std(a: &SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = a.as_sockaddr_in() {
        return Some(SocketAddr::from((v4.ip(), v4.port())));
    }
    a.as_sockaddr_in6()
        .map(|v6| SocketAddr::from((v6.ip(), v6.port())))
}

/// Outgoing datagrams collected during one loop iteration.
#[derive(Debug, Default)]
pub struct SendQueue {
    items: Vec<(SocketAddr, bytes::BytesMut)>,
    headers: Option<MultiHeaders<SockaddrStorage>>,
}

impl SendQueue {
    /// Queues a datagram.
    pub fn push(&mut self, to: SocketAddr, data: bytes::BytesMut) {
        self.items.push((to, data));
    }

    /// Sends everything queued, [`BATCH`] datagrams per system call.
    /// Returns (datagrams, bytes) sent; datagrams the kernel refuses are
    /// dropped (UDP is lossy anyway) and counted by the caller as the
    /// difference.
    pub fn flush(&mut self, socket: &UdpSocket) -> (u64, u64) {
        let headers = self
            .headers
            .get_or_insert_with(|| MultiHeaders::preallocate(BATCH, None));
        let mut sent = 0u64;
        let mut bytes = 0u64;
        for chunk in self.items.chunks(BATCH) {
            let slices: Vec<[IoSlice<'_>; 1]> =
                chunk.iter().map(|(_, d)| [IoSlice::new(&d[..])]).collect();
            let addrs: Vec<Option<SockaddrStorage>> = chunk
                .iter()
                .map(|(a, _)| Some(SockaddrStorage::from(*a)))
                .collect();
            let mut offset = 0;
            // Retry the tail if the kernel took only part of the batch.
            while offset < slices.len() {
                match sendmmsg(
                    socket.as_raw_fd(),
                    headers,
                    slices[offset..].iter(),
                    &addrs[offset..],
                    [],
                    MsgFlags::MSG_DONTWAIT,
                ) {
                    Ok(results) => {
                        let mut n = 0;
                        for r in results {
                            n += 1;
                            bytes += r.bytes as u64;
                        }
                        if n == 0 {
                            break;
                        }
                        sent += n as u64;
                        offset += n;
                    }
                    Err(nix::errno::Errno::EINTR) => continue,
                    // EAGAIN (buffer full) or a per-destination error: drop
                    // this datagram and go on with the rest.
                    Err(_) => offset += 1,
                }
            }
        }
        self.items.clear();
        (sent, bytes)
    }
}

/// Wakes a worker blocked in [`wait`].
#[derive(Debug)]
pub struct Waker {
    fd: EventFd,
}

impl Waker {
    /// A new eventfd-based waker.
    pub fn new() -> io::Result<Self> {
        let fd = EventFd::from_flags(EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC)?;
        Ok(Self { fd })
    }

    /// Wakes the worker.
    pub fn wake(&self) {
        let _ = self.fd.write(1);
    }

    fn clear(&self) {
        let _ = self.fd.read();
    }
}

/// Blocks until the socket is readable, the waker fires, or `timeout`
/// passes. Returns whether the waker fired.
pub fn wait(socket: &UdpSocket, waker: &Waker, timeout: Option<Duration>) -> io::Result<bool> {
    let ms = timeout.map_or(PollTimeout::NONE, |t| {
        let ms = t.as_millis().min(60_000) as u16;
        // Round up so a sub-millisecond deadline does not spin.
        let ms = if t.as_nanos() > 0 && ms == 0 { 1 } else { ms };
        PollTimeout::from(ms)
    });
    let mut fds = [
        PollFd::new(socket.as_fd(), PollFlags::POLLIN),
        PollFd::new(waker.fd.as_fd(), PollFlags::POLLIN),
    ];
    match poll(&mut fds, ms) {
        Ok(_) => {}
        Err(nix::errno::Errno::EINTR) => return Ok(false),
        Err(e) => return Err(e.into()),
    }
    let woke = fds[1]
        .revents()
        .is_some_and(|r| r.contains(PollFlags::POLLIN));
    if woke {
        waker.clear();
    }
    Ok(woke)
}
