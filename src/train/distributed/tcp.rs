//! The rendezvous at `MASTER_ADDR:MASTER_PORT` and the CPU reductions over its sockets: rank 0
//! listens, every other rank connects (retrying until the deadline) and says who it is; when all
//! are there rank 0 answers each. The group is a star: a reduction sends every rank's values to
//! rank 0, which sums them in rank order and sends the sum back, so every rank gets the same bits.
//! Rank 0 also broadcasts bytes (the NCCL unique id). Every wait is bounded (the rendezvous
//! timeout, then `ddp_timeout`), and a rank that is missing, exits or stalls is named.

use anyhow::{bail, Result};
use candle_core::Tensor;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::Mutex;
use std::time::{Duration, Instant};

const MAGIC: &[u8; 8] = b"QSRDZV01";
/// torch's `ddp_timeout` default.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1800);

/// One rank's end of the star.
pub struct TcpGroup {
    rank: usize,
    world: usize,
    /// Rank 0: the stream of rank `r` at `r - 1`. Other ranks: rank 0's.
    peers: Mutex<Vec<TcpStream>>,
    timeout: Mutex<Duration>,
}

fn resolve(addr: &str, port: u16) -> std::io::Result<SocketAddr> {
    (addr, port).to_socket_addrs()?.next().ok_or_else(|| std::io::Error::new(ErrorKind::NotFound, "no address"))
}

fn secs(d: Duration) -> String {
    format!("{}s", (d.as_secs_f64() * 10.0).round() / 10.0)
}

fn write_frame(s: &mut TcpStream, bytes: &[u8]) -> std::io::Result<()> {
    s.write_all(&(bytes.len() as u64).to_le_bytes())?;
    s.write_all(bytes)
}

fn read_frame(s: &mut TcpStream, max: usize) -> std::io::Result<Vec<u8>> {
    let mut len = [0u8; 8];
    s.read_exact(&mut len)?;
    let len = u64::from_le_bytes(len) as usize;
    if len > max {
        return Err(std::io::Error::new(ErrorKind::InvalidData, format!("a message of {len} bytes where at most {max} were expected")));
    }
    let mut buf = vec![0u8; len];
    s.read_exact(&mut buf)?;
    Ok(buf)
}

/// Meets the other ranks of a group of `world` at `addr:port` within `timeout`.
pub fn rendezvous(addr: &str, port: u16, rank: usize, world: usize, timeout: Duration) -> Result<TcpGroup> {
    anyhow::ensure!(world >= 1 && rank < world, "rendezvous: rank {rank} of a group of {world}");
    let deadline = Instant::now() + timeout;
    let peers = if world == 1 {
        vec![]
    } else if rank == 0 {
        accept_all(addr, port, world, timeout, deadline)?
    } else {
        vec![connect(addr, port, rank, world, timeout, deadline)?]
    };
    for s in &peers {
        s.set_nodelay(true)?;
    }
    let g = TcpGroup { rank, world, peers: Mutex::new(peers), timeout: Mutex::new(DEFAULT_TIMEOUT) };
    g.set_timeout(DEFAULT_TIMEOUT);
    Ok(g)
}

/// Rank 0: listens until ranks 1..world said hello, then answers each (or tells them what failed).
fn accept_all(addr: &str, port: u16, world: usize, timeout: Duration, deadline: Instant) -> Result<Vec<TcpStream>> {
    let at = resolve(addr, port).map_err(|e| anyhow::anyhow!("rendezvous: MASTER_ADDR={addr}: cannot resolve ({e})"))?;
    // Loopback stays loopback; any other address listens on every interface (other nodes connect).
    let bind = if at.ip().is_loopback() { at } else { SocketAddr::new(if at.is_ipv4() { [0, 0, 0, 0].into() } else { std::net::Ipv6Addr::UNSPECIFIED.into() }, port) };
    let listener = TcpListener::bind(bind).map_err(|e| anyhow::anyhow!("rendezvous: rank 0 cannot listen on {bind} (MASTER_PORT={port}): {e}"))?;
    listener.set_nonblocking(true)?;
    let mut peers: Vec<Option<TcpStream>> = (1..world).map(|_| None).collect();
    let fail = |peers: &mut Vec<Option<TcpStream>>, msg: String| -> anyhow::Error {
        for s in peers.iter_mut().flatten() {
            let mut m = vec![1u8];
            m.extend_from_slice(msg.as_bytes());
            let _ = write_frame(s, &m);
        }
        anyhow::anyhow!("{msg}")
    };
    while peers.iter().any(Option::is_none) {
        match listener.accept() {
            Ok((mut s, from)) => {
                s.set_nonblocking(false)?;
                s.set_read_timeout(Some(Duration::from_secs(5).min(deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(100)))))?;
                let mut hello = [0u8; 16];
                if s.read_exact(&mut hello).is_err() || &hello[..8] != MAGIC {
                    continue; // not a rank of ours (a port scan, a stale client): ignored
                }
                let r = u32::from_le_bytes(hello[8..12].try_into().expect("4 bytes")) as usize;
                let w = u32::from_le_bytes(hello[12..16].try_into().expect("4 bytes")) as usize;
                let refused = if w != world {
                    Some(format!("rendezvous: rank {r} (from {from}) has WORLD_SIZE={w}, rank 0 has {world}"))
                } else if r == 0 || r >= world || peers[r - 1].is_some() {
                    Some(format!("rendezvous: two processes say RANK={r} (one from {from})"))
                } else {
                    None
                };
                if let Some(msg) = refused {
                    // The one refused is told too.
                    let mut v = vec![1u8];
                    v.extend_from_slice(msg.as_bytes());
                    let _ = write_frame(&mut s, &v);
                    return Err(fail(&mut peers, msg));
                }
                peers[r - 1] = Some(s);
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    let missing: Vec<String> = peers.iter().enumerate().filter(|(_, p)| p.is_none()).map(|(i, _)| (i + 1).to_string()).collect();
                    let (s, list) = if missing.len() == 1 { ("", missing[0].clone()) } else { ("s", missing.join(", ")) };
                    return Err(fail(&mut peers, format!("rendezvous at {addr}:{port}: rank{s} {list} did not connect within {} (WORLD_SIZE={world})", secs(timeout))));
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(fail(&mut peers, format!("rendezvous: rank 0 cannot accept on {bind}: {e}"))),
        }
    }
    let mut peers: Vec<TcpStream> = peers.into_iter().flatten().collect();
    for (i, s) in peers.iter_mut().enumerate() {
        write_frame(s, &[0u8]).map_err(|e| anyhow::anyhow!("rendezvous: rank {} left before it was answered: {e}", i + 1))?;
    }
    Ok(peers)
}

/// Ranks above 0: connects (retrying until rank 0 listens), says hello, waits for the answer.
fn connect(addr: &str, port: u16, rank: usize, world: usize, timeout: Duration, deadline: Instant) -> Result<TcpStream> {
    let mut s = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let tried = resolve(addr, port).and_then(|a| TcpStream::connect_timeout(&a, left.clamp(Duration::from_millis(10), Duration::from_secs(1))));
        match tried {
            Ok(s) => break s,
            Err(e) if left.is_zero() => bail!("rendezvous: rank 0 did not answer at {addr}:{port} within {} (this is rank {rank}): {e}", secs(timeout)),
            Err(_) => std::thread::sleep(Duration::from_millis(50).min(left)),
        }
    };
    let mut hello = MAGIC.to_vec();
    hello.extend_from_slice(&(rank as u32).to_le_bytes());
    hello.extend_from_slice(&(world as u32).to_le_bytes());
    s.write_all(&hello)?;
    s.set_read_timeout(Some(deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(100)) + Duration::from_secs(1)))?;
    let answer = match read_frame(&mut s, 1 << 16) {
        Ok(a) => a,
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
            bail!("rendezvous at {addr}:{port}: the group of {world} was not complete within {} (rank {rank} waited for rank 0)", secs(timeout))
        }
        Err(e) => bail!("rendezvous at {addr}:{port}: rank 0 closed the connection ({e}) (this is rank {rank})"),
    };
    match answer.split_first() {
        Some((0, _)) => Ok(s),
        Some((_, msg)) => bail!("{} (reported by rank 0 to rank {rank})", String::from_utf8_lossy(msg)),
        None => bail!("rendezvous at {addr}:{port}: an empty answer from rank 0"),
    }
}

/// Values a reduction sums.
trait Elem: Copy + std::ops::AddAssign {
    const SIZE: usize;
    fn put(self, out: &mut Vec<u8>);
    fn get(b: &[u8]) -> Self;
}

impl Elem for f32 {
    const SIZE: usize = 4;
    fn put(self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.to_le_bytes())
    }
    fn get(b: &[u8]) -> Self {
        f32::from_le_bytes(b.try_into().expect("4 bytes"))
    }
}

impl Elem for f64 {
    const SIZE: usize = 8;
    fn put(self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.to_le_bytes())
    }
    fn get(b: &[u8]) -> Self {
        f64::from_le_bytes(b.try_into().expect("8 bytes"))
    }
}

fn bytes<T: Elem>(v: &[T]) -> Vec<u8> {
    let mut out = Vec::with_capacity(v.len() * T::SIZE);
    for &x in v {
        x.put(&mut out);
    }
    out
}

impl TcpGroup {
    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn world_size(&self) -> usize {
        self.world
    }

    /// Every later wait for a rank is bounded by `timeout` (`ddp_timeout`).
    pub fn set_timeout(&self, timeout: Duration) {
        *self.timeout.lock().unwrap_or_else(|e| e.into_inner()) = timeout;
        for s in self.peers.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            let _ = s.set_read_timeout(Some(timeout));
            let _ = s.set_write_timeout(Some(timeout));
        }
    }

    /// A one-line error about rank `peer` (and [`super::PEER_LOST`] set: this rank fails because
    /// of another).
    fn peer_error(&self, peer: usize, e: std::io::Error) -> anyhow::Error {
        super::PEER_LOST.store(true, std::sync::atomic::Ordering::SeqCst);
        let t = *self.timeout.lock().unwrap_or_else(|e| e.into_inner());
        match e.kind() {
            ErrorKind::UnexpectedEof | ErrorKind::ConnectionReset | ErrorKind::BrokenPipe | ErrorKind::ConnectionAborted => {
                anyhow::anyhow!("distributed: rank {peer} left the group (its connection closed: the process exited or died); this is rank {}", self.rank)
            }
            ErrorKind::WouldBlock | ErrorKind::TimedOut => {
                anyhow::anyhow!("distributed: rank {peer} did not answer within {} (ddp_timeout); this is rank {}", secs(t), self.rank)
            }
            _ => anyhow::anyhow!("distributed: rank {peer}: {e}; this is rank {}", self.rank),
        }
    }

    fn all_reduce<T: Elem>(&self, buf: &mut [T]) -> Result<()> {
        if self.world == 1 {
            return Ok(());
        }
        let mut peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        let n = buf.len() * T::SIZE;
        if self.rank == 0 {
            for (i, s) in peers.iter_mut().enumerate() {
                let got = read_frame(s, n).map_err(|e| self.peer_error(i + 1, e))?;
                if got.len() != n {
                    bail!("distributed: rank {} sent {} values, rank 0 has {} (the ranks are not running the same steps)", i + 1, got.len() / T::SIZE, buf.len());
                }
                for (a, c) in buf.iter_mut().zip(got.chunks_exact(T::SIZE)) {
                    *a += T::get(c);
                }
            }
            let sum = bytes(buf);
            for (i, s) in peers.iter_mut().enumerate() {
                write_frame(s, &sum).map_err(|e| self.peer_error(i + 1, e))?;
            }
        } else {
            let s = &mut peers[0];
            write_frame(s, &bytes(buf)).map_err(|e| self.peer_error(0, e))?;
            let got = read_frame(s, n).map_err(|e| self.peer_error(0, e))?;
            if got.len() != n {
                bail!("distributed: rank 0 sent {} values, rank {} has {} (the ranks are not running the same steps)", got.len() / T::SIZE, self.rank, buf.len());
            }
            for (a, c) in buf.iter_mut().zip(got.chunks_exact(T::SIZE)) {
                *a = T::get(c);
            }
        }
        Ok(())
    }

    pub fn all_reduce_f32(&self, buf: &mut [f32]) -> Result<()> {
        self.all_reduce(buf)
    }

    pub fn all_reduce_f64(&self, buf: &mut [f64]) -> Result<()> {
        self.all_reduce(buf)
    }

    pub fn all_reduce_tensor(&self, t: &Tensor) -> Result<Tensor> {
        let mut v = t.to_vec1::<f32>()?;
        self.all_reduce_f32(&mut v)?;
        Ok(Tensor::from_vec(v, t.dims(), t.device())?)
    }

    /// Rank 0's `bytes` on every rank (the others pass anything; theirs is replaced).
    pub fn broadcast(&self, bytes: &mut Vec<u8>, max: usize) -> Result<()> {
        let mut peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        if self.rank == 0 {
            for (i, s) in peers.iter_mut().enumerate() {
                write_frame(s, bytes).map_err(|e| self.peer_error(i + 1, e))?;
            }
        } else if let Some(s) = peers.first_mut() {
            *bytes = read_frame(s, max).map_err(|e| self.peer_error(0, e))?;
        }
        Ok(())
    }
}

impl super::Collective for TcpGroup {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world
    }
    fn all_reduce_f64(&self, buf: &mut [f64]) -> Result<()> {
        TcpGroup::all_reduce_f64(self, buf)
    }
    fn all_reduce_f32(&self, buf: &mut [f32]) -> Result<()> {
        TcpGroup::all_reduce_f32(self, buf)
    }
    fn all_reduce_tensor(&self, t: &Tensor) -> Result<Tensor> {
        TcpGroup::all_reduce_tensor(self, t)
    }
    fn set_timeout(&self, timeout: Duration) {
        TcpGroup::set_timeout(self, timeout)
    }
}

impl crate::kernels::all_reduce::Group for TcpGroup {
    fn rank(&self) -> usize {
        TcpGroup::rank(self)
    }
    fn world_size(&self) -> usize {
        TcpGroup::world_size(self)
    }
    fn broadcast(&self, bytes: &mut Vec<u8>, max: usize) -> Result<()> {
        TcpGroup::broadcast(self, bytes, max)
    }
    fn all_reduce_host(&self, t: &Tensor) -> Result<Tensor> {
        self.all_reduce_tensor(t)
    }
}

/// A free TCP port on the loopback (the launcher's default `MASTER_PORT`, tests).
pub fn free_port() -> Result<u16> {
    Ok(TcpListener::bind(("127.0.0.1", 0))?.local_addr()?.port())
}

/// Runs `f(rank, group)` for every rank of a group of `world` on threads of this process, met
/// over the loopback: the tests' stand-in for `world` processes. The results in rank order.
pub fn run_threads<T: Send + 'static>(world: usize, f: impl Fn(usize, TcpGroup) -> Result<T> + Send + Sync + 'static) -> Result<Vec<T>> {
    let port = free_port()?;
    let f = std::sync::Arc::new(f);
    let handles: Vec<_> = (0..world)
        .map(|r| {
            let f = f.clone();
            std::thread::Builder::new().name(format!("rank-{r}")).stack_size(64 << 20).spawn(move || {
                let g = rendezvous("127.0.0.1", port, r, world, Duration::from_secs(60))?;
                f(r, g)
            })
        })
        .collect::<std::io::Result<_>>()?;
    let mut out = Vec::new();
    for (r, h) in handles.into_iter().enumerate() {
        match h.join() {
            Ok(v) => out.push(v.map_err(|e| e.context(format!("rank {r}")))?),
            Err(_) => bail!("rank {r} panicked"),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_rank_meets_nobody() {
        let g = rendezvous("127.0.0.1", 1, 0, 1, Duration::from_millis(10)).unwrap();
        let mut v = [1.0f32, 2.0];
        g.all_reduce_f32(&mut v).unwrap();
        assert_eq!(v, [1.0, 2.0]);
    }

    #[test]
    fn ranks_exchange_bytes_and_sum_in_rank_order() {
        for world in [2, 3] {
            let out = run_threads(world, move |r, g| {
                assert_eq!((g.rank(), g.world_size()), (r, world));
                let mut blob = if r == 0 { (0..128u8).collect() } else { vec![] };
                g.broadcast(&mut blob, 128)?;
                let mut v = [r as f32 + 0.5, 1e-8, -(r as f32)];
                g.all_reduce_f32(&mut v)?;
                let mut d = [r as f64, 1.0];
                g.all_reduce_f64(&mut d)?;
                let t = g.all_reduce_tensor(&Tensor::new(&[1f32, r as f32], &candle_core::Device::Cpu)?)?;
                Ok((blob, v, d, t.to_vec1::<f32>()?))
            })
            .unwrap();
            let n = world as f32;
            let tri = (0..world).map(|r| r as f32).sum::<f32>();
            let mut order = 0.5f32;
            for r in 1..world {
                order += r as f32 + 0.5;
            }
            for (blob, v, d, t) in &out {
                assert_eq!(blob, &(0..128u8).collect::<Vec<_>>());
                assert_eq!(v, &[order, 1e-8 * n, -tri]);
                assert_eq!(d, &[tri as f64, world as f64]);
                assert_eq!(t, &[n, tri]);
            }
        }
    }

    #[test]
    fn a_rank_that_never_shows_up_is_named_within_the_timeout() {
        let port = free_port().unwrap();
        let t0 = Instant::now();
        let r1 = std::thread::spawn(move || rendezvous("127.0.0.1", port, 1, 3, Duration::from_millis(1500)).err().map(|e| e.to_string()));
        let e = rendezvous("127.0.0.1", port, 0, 3, Duration::from_millis(800)).err().unwrap().to_string();
        assert!(e.contains("rank 2 did not connect within 0.8s") && !e.contains('\n'), "{e}");
        let e1 = r1.join().unwrap().unwrap();
        assert!(e1.contains("rank 2 did not connect") && e1.contains("rank 1"), "{e1}");
        assert!(t0.elapsed() < Duration::from_secs(5));
        // Rank 0 never listening: the others give up at their deadline, naming rank 0.
        let port = free_port().unwrap();
        let e = rendezvous("127.0.0.1", port, 1, 2, Duration::from_millis(300)).err().unwrap().to_string();
        assert!(e.contains("rank 0 did not answer") && e.contains("rank 1"), "{e}");
    }

    #[test]
    fn a_rank_that_leaves_or_stalls_is_named() {
        let out = run_threads(3, |r, g| {
            g.set_timeout(Duration::from_millis(500));
            let mut v = [1.0f32];
            g.all_reduce_f32(&mut v)?;
            if r == 2 {
                return Ok(String::new()); // leaves: its socket closes
            }
            if r == 1 {
                std::thread::sleep(Duration::from_millis(1500)); // stalls past the timeout
                return Ok(String::new());
            }
            Ok(g.all_reduce_f32(&mut v).unwrap_err().to_string())
        })
        .unwrap();
        assert!(out[0].contains("rank 1 did not answer within 0.5s (ddp_timeout)"), "{}", out[0]);
        let out = run_threads(2, |r, g| {
            let mut v = [1.0f32];
            if r == 1 {
                return Ok(String::new());
            }
            Ok(g.all_reduce_f32(&mut v).unwrap_err().to_string())
        })
        .unwrap();
        assert!(out[0].contains("rank 1 left the group"), "{}", out[0]);
    }

    #[test]
    fn ranks_of_different_sizes_are_refused() {
        let port = free_port().unwrap();
        let r1 = std::thread::spawn(move || rendezvous("127.0.0.1", port, 1, 3, Duration::from_secs(5)).err().map(|e| e.to_string()));
        let e = rendezvous("127.0.0.1", port, 0, 2, Duration::from_secs(5)).err().unwrap().to_string();
        assert!(e.contains("rank 1") && e.contains("WORLD_SIZE=3, rank 0 has 2"), "{e}");
        assert!(r1.join().unwrap().unwrap().contains("WORLD_SIZE=3"));
    }
}
