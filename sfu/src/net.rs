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
    ControlMessage, ControlMessageOwned, MsgFlags, MultiHeaders, SockaddrStorage, recvmmsg,
    sendmmsg, setsockopt, sockopt,
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

/// Most datagrams one UDP GSO send carries (the kernel allows 64 or more).
const MAX_SEGMENTS: usize = 64;
/// Most payload bytes one UDP GSO send carries (one IP packet's worth).
const MAX_GSO_BYTES: usize = 65_000;
/// Datagrams larger than this are never segmented: a segment must fit the
/// path MTU (1500 bytes less the IPv6 and UDP headers).
const MAX_SEGMENT: usize = 1452;

/// One message of a `sendmmsg` call: `count` queued datagrams from `start`,
/// all to one destination. With more than one, they go as one UDP GSO send
/// (`UDP_SEGMENT`): all of `segment` bytes but the last, which may be
/// shorter, and the kernel (or the NIC) cuts them apart again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Message {
    start: usize,
    count: usize,
    /// Bytes of every datagram but the last; also the largest of them.
    segment: usize,
}

/// Splits the queue into messages: each run of datagrams to one destination
/// that share a size (a frame's full packets), plus one shorter datagram
/// that may end the run (the frame's last packet), becomes one GSO message
/// when `gso` is on; anything else is a message of its own.
fn plan(items: &[(SocketAddr, bytes::BytesMut)], gso: bool, out: &mut Vec<Message>) {
    out.clear();
    let mut i = 0;
    while let Some((to, first)) = items.get(i) {
        let segment = first.len();
        let mut count = 1;
        let mut total = segment;
        if gso && (1..=MAX_SEGMENT).contains(&segment) {
            while let Some((next_to, next)) = items.get(i + count) {
                let len = next.len();
                if next_to != to
                    || len == 0
                    || len > segment
                    || count == MAX_SEGMENTS
                    || total + len > MAX_GSO_BYTES
                {
                    break;
                }
                count += 1;
                total += len;
                if len < segment {
                    break;
                }
            }
        }
        out.push(Message {
            start: i,
            count,
            segment,
        });
        i += count;
    }
}

/// How many of `messages` (at most [`BATCH`]) one `sendmmsg` call can take,
/// and the `UDP_SEGMENT` size it must carry, if any. One call carries one
/// segment size for all its messages; a single datagram no larger than it
/// goes out whole, so single datagrams mix with GSO messages of one size.
fn call_span(messages: &[Message]) -> (usize, Option<u16>) {
    let mut segment: Option<usize> = None;
    let mut largest_single = 0;
    let mut n = 0;
    for m in messages.iter().take(BATCH) {
        if m.count > 1 {
            match segment {
                Some(s) if s != m.segment => break,
                None if largest_single > m.segment => break,
                _ => segment = Some(m.segment),
            }
        } else if segment.is_some_and(|s| m.segment > s) {
            break;
        } else {
            largest_single = largest_single.max(m.segment);
        }
        n += 1;
    }
    // `plan` keeps segments to MAX_SEGMENT, well within u16.
    (n, segment.and_then(|s| u16::try_from(s).ok()))
}

/// Outgoing datagrams collected during one loop iteration.
#[derive(Debug)]
pub struct SendQueue {
    items: Vec<(SocketAddr, bytes::BytesMut)>,
    /// Whether runs of datagrams to one destination go as UDP GSO sends;
    /// off for good once the kernel refuses one (an old kernel, or a device
    /// without checksum offload).
    gso: bool,
    /// Datagrams sent inside GSO sends, see [`SendQueue::take_segmented`].
    segmented: u64,
    /// Tests: the next GSO send fails as a kernel without GSO would.
    #[cfg(test)]
    refuse_gso: bool,
    messages: Vec<Message>,
}

/// The `sendmmsg` headers of one thread (they hold raw pointers, so they
/// stay on their thread while queues move between a worker and its helper).
#[derive(Default)]
struct Headers {
    plain: Option<MultiHeaders<SockaddrStorage>>,
    /// With room for the `UDP_SEGMENT` control message.
    gso: Option<MultiHeaders<SockaddrStorage>>,
}

thread_local! {
    static HEADERS: std::cell::RefCell<Headers> = std::cell::RefCell::default();
}

impl SendQueue {
    /// An empty queue; `gso`: send runs of datagrams to one destination as
    /// one UDP GSO send where the kernel allows it.
    pub fn new(gso: bool) -> Self {
        Self {
            items: Vec::new(),
            gso,
            segmented: 0,
            #[cfg(test)]
            refuse_gso: false,
            messages: Vec::new(),
        }
    }

    /// How many datagrams went out inside UDP GSO sends since the last call.
    pub fn take_segmented(&mut self) -> u64 {
        std::mem::take(&mut self.segmented)
    }

    /// Drops whatever is queued.
    pub fn clear(&mut self) {
        self.items.clear();
    }

    /// Queues a datagram.
    pub fn push(&mut self, to: SocketAddr, data: bytes::BytesMut) {
        self.items.push((to, data));
    }

    /// Sends everything queued, up to [`BATCH`] messages per system call.
    /// Returns (datagrams, bytes) sent; datagrams the kernel refuses are
    /// dropped (UDP is lossy anyway) and counted by the caller as the
    /// difference.
    pub fn flush(&mut self, socket: &UdpSocket) -> (u64, u64) {
        let sent = HEADERS.with(|cell| match cell.try_borrow_mut() {
            Ok(mut headers) => self.send(socket, &mut headers),
            Err(_) => self.send(socket, &mut Headers::default()),
        });
        self.items.clear();
        sent
    }

    fn send(&mut self, socket: &UdpSocket, headers: &mut Headers) -> (u64, u64) {
        let mut sent = 0u64;
        let mut bytes = 0u64;
        plan(&self.items, self.gso, &mut self.messages);
        let mut next = 0;
        while next < self.messages.len() {
            let (n, segment) = call_span(&self.messages[next..]);
            let call = &self.messages[next..next + n.max(1)];
            // Declared before the slices: the call borrows both for as long.
            let size = segment.unwrap_or(0);
            let slices: Vec<IoSlice<'_>> = self.items[call[0].start..]
                .iter()
                .take(call.iter().map(|m| m.count).sum())
                .map(|(_, d)| IoSlice::new(&d[..]))
                .collect();
            let base = call[0].start;
            let per_message: Vec<&[IoSlice<'_>]> = call
                .iter()
                .map(|m| &slices[m.start - base..m.start - base + m.count])
                .collect();
            let addrs: Vec<Option<SockaddrStorage>> = call
                .iter()
                .map(|m| Some(SockaddrStorage::from(self.items[m.start].0)))
                .collect();
            let mut offset = 0;
            let mut refused = false;
            // Retry the tail if the kernel took only part of the call.
            while offset < call.len() {
                #[cfg(test)]
                if segment.is_some() && std::mem::take(&mut self.refuse_gso) {
                    self.gso = false;
                    refused = true;
                    break;
                }
                let result = match segment {
                    Some(_) => sendmmsg(
                        socket.as_raw_fd(),
                        headers.gso.get_or_insert_with(|| {
                            MultiHeaders::preallocate(BATCH, Some(nix::cmsg_space!(u16)))
                        }),
                        per_message[offset..].iter(),
                        &addrs[offset..],
                        [ControlMessage::UdpGsoSegments(&size)],
                        MsgFlags::MSG_DONTWAIT,
                    ),
                    None => sendmmsg(
                        socket.as_raw_fd(),
                        headers
                            .plain
                            .get_or_insert_with(|| MultiHeaders::preallocate(BATCH, None)),
                        per_message[offset..].iter(),
                        &addrs[offset..],
                        [],
                        MsgFlags::MSG_DONTWAIT,
                    ),
                };
                match result {
                    Ok(results) => {
                        let mut n = 0;
                        for r in results {
                            let count = call.get(offset + n).map_or(1, |m| m.count as u64);
                            bytes += r.bytes as u64;
                            sent += count;
                            if count > 1 {
                                self.segmented += count;
                            }
                            n += 1;
                        }
                        if n == 0 {
                            break;
                        }
                        offset += n;
                    }
                    Err(nix::errno::Errno::EINTR) => continue,
                    // The kernel cannot segment here: send datagram by
                    // datagram from now on, starting with this message.
                    Err(
                        e @ (nix::errno::Errno::EIO
                        | nix::errno::Errno::EINVAL
                        | nix::errno::Errno::EOPNOTSUPP
                        | nix::errno::Errno::ENOPROTOOPT),
                    ) if call[offset].count > 1 => {
                        tracing::warn!(error = %e, "UDP GSO refused: sending datagram by datagram");
                        self.gso = false;
                        refused = true;
                        break;
                    }
                    // EAGAIN (buffer full) or a per-destination error: drop
                    // this message and go on with the rest.
                    Err(_) => offset += 1,
                }
            }
            if refused {
                // GSO refused: plan the rest without it.
                let from = call[offset].start;
                plan(&self.items[from..], false, &mut self.messages);
                for m in &mut self.messages {
                    m.start += from;
                }
                next = 0;
                continue;
            }
            next += n.max(1);
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn queue(items: &[(u16, usize)]) -> Vec<(SocketAddr, bytes::BytesMut)> {
        items
            .iter()
            .enumerate()
            .map(|(i, &(port, len))| {
                let to = SocketAddr::from(([127, 0, 0, 1], port));
                (to, bytes::BytesMut::from(&vec![i as u8; len][..]))
            })
            .collect()
    }

    fn planned(items: &[(u16, usize)], gso: bool) -> Vec<(usize, usize, usize)> {
        let mut out = Vec::new();
        plan(&queue(items), gso, &mut out);
        out.iter().map(|m| (m.start, m.count, m.segment)).collect()
    }

    #[test]
    fn a_frame_to_one_destination_is_one_message() {
        // Three full packets and a short last one, then audio elsewhere.
        let items = [(1, 1200), (1, 1200), (1, 1200), (1, 300), (2, 120)];
        assert_eq!(planned(&items, true), vec![(0, 4, 1200), (4, 1, 120)]);
        // Without GSO, one message per datagram.
        assert_eq!(planned(&items, false).len(), 5);
    }

    #[test]
    fn runs_break_on_destination_size_and_limits() {
        // A larger datagram after a smaller one starts a new run; so does a
        // new destination; a shorter one ends the run it joins.
        let items = [(1, 500), (1, 1200), (1, 1200), (1, 900), (1, 900), (3, 900)];
        assert_eq!(
            planned(&items, true),
            vec![(0, 1, 500), (1, 3, 1200), (4, 1, 900), (5, 1, 900)]
        );
        // Oversized datagrams are never segmented.
        assert_eq!(
            planned(&[(1, 1480), (1, 1480)], true),
            vec![(0, 1, 1480), (1, 1, 1480)]
        );
        // At most MAX_SEGMENTS per message, and at most MAX_GSO_BYTES.
        let many = vec![(1, 100); MAX_SEGMENTS + 1];
        assert_eq!(
            planned(&many, true),
            vec![(0, MAX_SEGMENTS, 100), (MAX_SEGMENTS, 1, 100)]
        );
        let big = vec![(1, 1400); 60];
        let p = planned(&big, true);
        assert!(p.iter().all(|&(_, n, s)| n * s <= MAX_GSO_BYTES));
        assert_eq!(p.iter().map(|&(_, n, _)| n).sum::<usize>(), 60);
    }

    #[test]
    fn one_call_carries_one_segment_size() {
        let m = |count, segment| Message {
            start: 0,
            count,
            segment,
        };
        // Singles no larger than the segment mix with it.
        assert_eq!(
            call_span(&[m(1, 100), m(3, 1200), m(1, 1200), m(2, 1200)]),
            (4, Some(1200))
        );
        // A group of another size, or a larger single, ends the call.
        assert_eq!(call_span(&[m(3, 1200), m(2, 900)]), (1, Some(1200)));
        assert_eq!(call_span(&[m(3, 900), m(1, 1000)]), (1, Some(900)));
        assert_eq!(call_span(&[m(1, 1000), m(3, 900)]), (1, None));
        // No groups: no segment size, up to BATCH messages.
        assert_eq!(call_span(&vec![m(1, 100); BATCH + 5]), (BATCH, None));
    }

    /// Sends `items` (port ignored: all to one receiver, except that each
    /// distinct port maps to its own receiver) and returns what each
    /// receiver got, in order.
    fn round_trip(gso: bool, refuse: bool, lens: &[(usize, usize)]) -> Vec<Vec<Vec<u8>>> {
        let receivers: Vec<UdpSocket> = (0..2)
            .map(|_| UdpSocket::bind("127.0.0.1:0").expect("bind"))
            .collect();
        for r in &receivers {
            r.set_read_timeout(Some(Duration::from_secs(2)))
                .expect("timeout");
        }
        let sender = UdpSocket::bind("127.0.0.1:0").expect("bind");
        let mut q = SendQueue::new(gso);
        q.refuse_gso = refuse;
        for (i, &(to, len)) in lens.iter().enumerate() {
            let addr = receivers[to].local_addr().expect("addr");
            q.push(addr, bytes::BytesMut::from(&vec![i as u8; len][..]));
        }
        let (n, bytes) = q.flush(&sender);
        assert_eq!(n, lens.len() as u64);
        assert_eq!(bytes, lens.iter().map(|&(_, l)| l as u64).sum::<u64>());
        if refuse {
            assert!(!q.gso, "a refusal turns GSO off for good");
        }
        if !gso || refuse {
            assert_eq!(q.take_segmented(), 0);
        } else {
            // GSO works on loopback (Linux 4.18 on): the two runs go whole.
            assert_eq!(q.take_segmented(), 6);
        }
        receivers
            .iter()
            .enumerate()
            .map(|(r, sock)| {
                let expected = lens.iter().filter(|&&(to, _)| to == r).count();
                (0..expected)
                    .map(|_| {
                        let mut buf = [0u8; 2000];
                        let n = sock.recv(&mut buf).expect("datagram");
                        buf[..n].to_vec()
                    })
                    .collect()
            })
            .collect()
    }

    #[test]
    fn segmented_sends_arrive_as_the_queued_datagrams() {
        let lens = [
            (0, 1200),
            (0, 1200),
            (0, 1200),
            (0, 333),
            (1, 90),
            (1, 1200),
            (1, 1200),
            (0, 80),
        ];
        for (gso, refuse) in [(true, false), (false, false), (true, true)] {
            let got = round_trip(gso, refuse, &lens);
            for (r, datagrams) in got.iter().enumerate() {
                let expected: Vec<Vec<u8>> = lens
                    .iter()
                    .enumerate()
                    .filter(|(_, (to, _))| *to == r)
                    .map(|(i, &(_, len))| vec![i as u8; len])
                    .collect();
                assert_eq!(
                    datagrams, &expected,
                    "receiver {r}, gso {gso}, refused {refuse}"
                );
            }
        }
    }
}
