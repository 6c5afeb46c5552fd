//! Data-parallel training: the seam the step reduces through ([`Collective`]), the process's
//! group as torchrun / srun / `qscript --nproc-per-node` describe it in the environment
//! ([`Env`]: `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`), each rank's rows of
//! a global batch ([`shard`]) and the one flat bucket the LoRA gradients are summed in
//! ([`all_reduce_grads`]).
//!
//! One process is [`Single`]: every reduction is the identity and the step never builds a bucket,
//! so a run without the environment is bit for bit the run it always was. Several processes meet
//! at `MASTER_ADDR:MASTER_PORT` ([`tcp::rendezvous`]); host values (token counts, loss sums) go
//! over those sockets, the gradient bucket through `kernels::all_reduce` (NCCL when it lives on a
//! GPU, the sockets on the CPU: the fallback torch calls gloo).


pub mod tcp;

use crate::model::engine::LoraGrad;
use crate::model::llama::Llama;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};
use std::ops::Range;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// A group of ranks that sum values together. Every rank calls the same reductions in the same
/// order; each returns the same sum on every rank.
pub trait Collective: Send + Sync {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// Sums `buf` over the ranks, in place (rank order: ((r0 + r1) + r2) …).
    fn all_reduce_f64(&self, buf: &mut [f64]) -> Result<()>;
    /// Sums `buf` over the ranks, in place.
    fn all_reduce_f32(&self, buf: &mut [f32]) -> Result<()>;
    /// The sum over the ranks of a 1-d f32 tensor, on its device. By default through the host.
    fn all_reduce_tensor(&self, t: &Tensor) -> Result<Tensor> {
        let mut v = t.to_vec1::<f32>()?;
        self.all_reduce_f32(&mut v)?;
        Ok(Tensor::from_vec(v, t.dims(), t.device())?)
    }
    /// How long a reduction waits for the slowest rank (`ddp_timeout`).
    fn set_timeout(&self, _timeout: Duration) {}
}

/// One process: the identity.
#[derive(Debug, Clone, Copy, Default)]
pub struct Single;

impl Collective for Single {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn all_reduce_f64(&self, _: &mut [f64]) -> Result<()> {
        Ok(())
    }
    fn all_reduce_f32(&self, _: &mut [f32]) -> Result<()> {
        Ok(())
    }
    fn all_reduce_tensor(&self, t: &Tensor) -> Result<Tensor> {
        Ok(t.clone())
    }
}

/// Whether any rank says `flag` (every rank gets the same answer; no communication alone).
pub fn any(c: &dyn Collective, flag: bool) -> Result<bool> {
    if c.world_size() == 1 {
        return Ok(flag);
    }
    let mut v = [flag as u8 as f64];
    c.all_reduce_f64(&mut v)?;
    Ok(v[0] > 0.0)
}

/// Waits until every rank got here (after rank 0 wrote what the others read next).
pub fn barrier(c: &dyn Collective) -> Result<()> {
    any(c, false).map(|_| ())
}

/// Rank `rank`'s rows of a global batch of `n` rows: contiguous, disjoint, their union all rows in
/// order; `n / world` or one more each (the last, short batch of an epoch may leave a rank none).
pub fn shard(n: usize, rank: usize, world: usize) -> Range<usize> {
    let world = world.max(1);
    n * rank / world..n * (rank + 1) / world
}

/// The step's LoRA gradients summed over the ranks, in one flat f32 bucket in the model's adapter
/// walk order (a rank without rows contributes zeros). Returned in f32, the same on every rank.
pub fn all_reduce_grads(c: &dyn Collective, model: &Llama, grads: Vec<LoraGrad>) -> Result<Vec<LoraGrad>> {
    let mut by_id: std::collections::HashMap<_, LoraGrad> = grads.into_iter().map(|g| (g.id(), g)).collect();
    let mut parts = Vec::new();
    let mut shapes = Vec::new();
    for (id, lo) in model.adapters() {
        let (da, db) = match by_id.remove(&id) {
            Some(g) => (g.da.to_dtype(DType::F32)?, g.db.to_dtype(DType::F32)?),
            None => (Tensor::zeros(lo.a.dims(), DType::F32, &model.device)?, Tensor::zeros(lo.b.dims(), DType::F32, &model.device)?),
        };
        shapes.push((id, da.dims().to_vec(), db.dims().to_vec()));
        parts.push(da.flatten_all()?);
        parts.push(db.flatten_all()?);
    }
    if let Some(id) = by_id.keys().next() {
        bail!("gradient of {id:?}, which is not an adapter of the model");
    }
    if parts.is_empty() {
        return Ok(vec![]);
    }
    let bucket = c.all_reduce_tensor(&Tensor::cat(&parts, 0)?)?;
    let mut at = 0;
    let mut out = Vec::with_capacity(shapes.len());
    for (id, sa, sb) in shapes {
        let (na, nb) = (sa.iter().product::<usize>(), sb.iter().product::<usize>());
        let da = bucket.narrow(0, at, na)?.reshape(sa)?;
        let db = bucket.narrow(0, at + na, nb)?.reshape(sb)?;
        at += na + nb;
        out.push(LoraGrad { layer: id.layer, proj: id.proj, da, db });
    }
    Ok(out)
}

/// The process's place in a data-parallel run, as torchrun sets it (or srun's `SLURM_*`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Env {
    pub rank: usize,
    pub world_size: usize,
    pub local_rank: usize,
    pub local_world_size: usize,
    pub master_addr: String,
    /// The rendezvous port: MASTER_PORT (+1 under torchrun's agent store, or QSCRIPT_RDZV_PORT).
    pub master_port: u16,
}

/// torchrun's defaults.
pub const DEFAULT_MASTER_ADDR: &str = "127.0.0.1";
pub const DEFAULT_MASTER_PORT: u16 = 29500;

impl Env {
    /// From the environment; `None` without `WORLD_SIZE` (nor `SLURM_NTASKS` > 1): one process.
    pub fn from_env() -> Result<Option<Env>> {
        Self::from_vars(|k| std::env::var(k).ok())
    }

    /// From `get` (the environment); one-line errors naming the variable.
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<Option<Env>> {
        let num = |k: &str| -> Result<Option<usize>> {
            match get(k) {
                None => Ok(None),
                Some(v) if v.trim().is_empty() => Ok(None),
                Some(v) => v.trim().parse::<usize>().map(Some).map_err(|_| anyhow::anyhow!("{k}={v}: expected a non-negative integer")),
            }
        };
        // torchrun's names first; srun's when only they are there.
        let (rank_k, world_k, local_k) = if num("WORLD_SIZE")?.is_some() {
            ("RANK", "WORLD_SIZE", "LOCAL_RANK")
        } else if num("SLURM_NTASKS")?.is_some_and(|n| n > 1) {
            ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID")
        } else {
            return Ok(None);
        };
        let world_size = num(world_k)?.context("unreachable")?;
        if world_size == 0 {
            bail!("{world_k}=0: expected at least 1");
        }
        let rank = num(rank_k)?.with_context(|| format!("{world_k}={world_size} is set but {rank_k} is not"))?;
        if rank >= world_size {
            bail!("{rank_k}={rank} is not below {world_k}={world_size}");
        }
        let local_world_size = num("LOCAL_WORLD_SIZE")?.or(num("SLURM_NTASKS_PER_NODE")?).unwrap_or(world_size);
        let local_rank = num(local_k)?.unwrap_or(rank % local_world_size.max(1));
        let master_addr = get("MASTER_ADDR").filter(|a| !a.trim().is_empty());
        if world_k == "SLURM_NTASKS" && master_addr.is_none() {
            bail!("SLURM_NTASKS={world_size}: MASTER_ADDR is not set (export MASTER_ADDR to the first node's address and MASTER_PORT to a free port)");
        }
        let port = |k: &str| -> Result<Option<u16>> {
            match get(k).filter(|p| !p.trim().is_empty()) {
                None => Ok(None),
                Some(p) => match p.trim().parse::<u16>() {
                    Ok(n) if n > 0 => Ok(Some(n)),
                    _ => bail!("{k}={p}: expected a TCP port (1-65535)"),
                },
            }
        };
        let mut master_port = port("MASTER_PORT")?.unwrap_or(DEFAULT_MASTER_PORT);
        // torchrun's agent serves its own store on MASTER_PORT (TORCHELASTIC_USE_AGENT_STORE):
        // the ranks then meet on the next port; QSCRIPT_RDZV_PORT chooses one outright.
        if get("TORCHELASTIC_USE_AGENT_STORE").is_some_and(|v| matches!(v.trim(), "True" | "true" | "1")) {
            master_port = master_port.checked_add(1).context("MASTER_PORT=65535: no next port for the rendezvous; set QSCRIPT_RDZV_PORT")?;
        }
        if let Some(p) = port("QSCRIPT_RDZV_PORT")? {
            master_port = p;
        }
        Ok(Some(Env { rank, world_size, local_rank, local_world_size, master_addr: master_addr.unwrap_or_else(|| DEFAULT_MASTER_ADDR.into()), master_port }))
    }
}

/// How long the rendezvous waits for every rank (`QSCRIPT_RDZV_TIMEOUT` seconds; torchrun's 900).
pub fn rendezvous_timeout() -> Result<Duration> {
    match std::env::var("QSCRIPT_RDZV_TIMEOUT") {
        Err(_) => Ok(Duration::from_secs(900)),
        Ok(v) => v.trim().parse::<f64>().ok().filter(|s| *s > 0.0).map(Duration::from_secs_f64).ok_or_else(|| anyhow::anyhow!("QSCRIPT_RDZV_TIMEOUT={v}: expected seconds")),
    }
}

/// Set when a reduction failed because another rank left, stalled or broke the protocol: the
/// process then exits with [`EXIT_PEER_LOST`], so a launcher can tell the rank that failed first
/// from the ranks that failed because of it.
pub static PEER_LOST: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
/// EX_TEMPFAIL.
pub const EXIT_PEER_LOST: i32 = 75;

static WORLD: OnceLock<Arc<dyn Collective>> = OnceLock::new();
static ENV: OnceLock<Env> = OnceLock::new();

/// A recipe run started with `WORLD_SIZE` > 1: meets the other ranks (bounded by
/// [`rendezvous_timeout`]) and makes them this process's group. Nothing to do for one process.
pub fn init_from_env() -> Result<Option<Env>> {
    let Some(env) = Env::from_env()? else { return Ok(None) };
    if env.world_size == 1 {
        return Ok(None);
    }
    if WORLD.get().is_some() {
        return Ok(ENV.get().cloned());
    }
    if std::env::var_os("NCCL_NVLS_ENABLE").is_none() {
        // NVLink multicast off (it fails on the machines this runs on); set before NCCL starts.
        std::env::set_var("NCCL_NVLS_ENABLE", "0");
    }
    let group = tcp::rendezvous(&env.master_addr, env.master_port, env.rank, env.world_size, rendezvous_timeout()?)?;
    let group: Arc<dyn Collective> = Arc::new(ProcessGroup::new(group));
    let _ = WORLD.set(group);
    let _ = ENV.set(env.clone());
    Ok(Some(env))
}

/// This process's group: the one [`init_from_env`] made, else [`Single`].
pub fn world() -> Arc<dyn Collective> {
    WORLD.get().cloned().unwrap_or_else(|| Arc::new(Single))
}

/// The process's `Env` of a multi-process run.
pub fn env() -> Option<&'static Env> {
    ENV.get()
}

/// Rank 0 (or one process): the one that writes the recipe's files (adapters, exports).
pub fn is_main_process() -> bool {
    WORLD.get().is_none_or(|w| w.rank() == 0)
}

/// The group of a multi-process run: host values over the rendezvous sockets; a GPU bucket over
/// NCCL (its communicator made at the first GPU reduction, its id sent by rank 0 over the
/// sockets), a host bucket over the sockets too.
pub struct ProcessGroup {
    tcp: tcp::TcpGroup,
    comm: crate::kernels::all_reduce::Communicator,
}

impl ProcessGroup {
    pub fn new(tcp: tcp::TcpGroup) -> Self {
        Self { tcp, comm: Default::default() }
    }
}

impl Collective for ProcessGroup {
    fn rank(&self) -> usize {
        self.tcp.rank()
    }
    fn world_size(&self) -> usize {
        self.tcp.world_size()
    }
    fn all_reduce_f64(&self, buf: &mut [f64]) -> Result<()> {
        self.tcp.all_reduce_f64(buf)
    }
    fn all_reduce_f32(&self, buf: &mut [f32]) -> Result<()> {
        self.tcp.all_reduce_f32(buf)
    }
    fn all_reduce_tensor(&self, t: &Tensor) -> Result<Tensor> {
        crate::kernels::all_reduce::all_reduce_sum(&self.comm, &self.tcp, t)
    }
    fn set_timeout(&self, timeout: Duration) {
        self.tcp.set_timeout(timeout)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(vars: &[(&str, &str)]) -> Result<Option<Env>> {
        let m: std::collections::HashMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Env::from_vars(|k| m.get(k).cloned())
    }

    #[test]
    fn shards_are_disjoint_cover_the_batch_in_order_and_full_batches_split_evenly() {
        for n in 0..20 {
            for world in 1..6 {
                let all: Vec<usize> = (0..world).flat_map(|r| shard(n, r, world)).collect();
                assert_eq!(all, (0..n).collect::<Vec<_>>(), "n {n} world {world}");
                for r in 0..world {
                    let l = shard(n, r, world).len();
                    assert!(l == n / world || l == n / world + 1, "n {n} world {world} rank {r}: {l}");
                }
            }
        }
        // A full global batch of per_device × world rows: rank r has rows r·per_device…
        assert_eq!(shard(8, 1, 2), 4..8);
        assert_eq!(shard(12, 2, 3), 8..12);
    }

    #[test]
    fn the_environment_of_torchrun_and_srun() {
        assert_eq!(env(&[]).unwrap(), None);
        assert_eq!(env(&[("WORLD_SIZE", ""), ("RANK", "")]).unwrap(), None);
        assert_eq!(env(&[("SLURM_NTASKS", "1"), ("SLURM_PROCID", "0")]).unwrap(), None);
        let e = env(&[("RANK", "1"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "1"), ("MASTER_ADDR", "10.0.0.1"), ("MASTER_PORT", "1234")]).unwrap().unwrap();
        assert_eq!(e, Env { rank: 1, world_size: 2, local_rank: 1, local_world_size: 2, master_addr: "10.0.0.1".into(), master_port: 1234 });
        let e = env(&[("RANK", "5"), ("WORLD_SIZE", "8"), ("LOCAL_WORLD_SIZE", "4")]).unwrap().unwrap();
        assert_eq!((e.local_rank, e.master_addr.as_str(), e.master_port), (1, "127.0.0.1", 29500));
        let e = env(&[("SLURM_NTASKS", "4"), ("SLURM_PROCID", "3"), ("SLURM_LOCALID", "1"), ("MASTER_ADDR", "n1")]).unwrap().unwrap();
        assert_eq!((e.rank, e.world_size, e.local_rank), (3, 4, 1));
        let torchrun = [("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_PORT", "29500"), ("TORCHELASTIC_USE_AGENT_STORE", "True")];
        assert_eq!(env(&torchrun).unwrap().unwrap().master_port, 29501);
        assert_eq!(env(&[("RANK", "0"), ("WORLD_SIZE", "2"), ("QSCRIPT_RDZV_PORT", "4000")]).unwrap().unwrap().master_port, 4000);
        for (vars, says) in [
            (&[("WORLD_SIZE", "2")][..], "WORLD_SIZE=2 is set but RANK is not"),
            (&[("WORLD_SIZE", "2"), ("RANK", "2")][..], "RANK=2 is not below WORLD_SIZE=2"),
            (&[("WORLD_SIZE", "two"), ("RANK", "0")][..], "WORLD_SIZE=two: expected a non-negative integer"),
            (&[("WORLD_SIZE", "2"), ("RANK", "0"), ("MASTER_PORT", "99999")][..], "MASTER_PORT=99999: expected a TCP port"),
            (&[("SLURM_NTASKS", "2"), ("SLURM_PROCID", "0")][..], "SLURM_NTASKS=2: MASTER_ADDR is not set"),
        ] {
            let e = env(vars).unwrap_err().to_string();
            assert!(e.starts_with(says) && !e.contains('\n'), "{e}");
        }
    }

    #[test]
    fn one_process_is_the_identity_without_communication() {
        let mut v = [1.5f32, -2.0];
        Single.all_reduce_f32(&mut v).unwrap();
        assert_eq!(v, [1.5, -2.0]);
        assert!(any(&Single, true).unwrap() && !any(&Single, false).unwrap());
        assert!(is_main_process());
    }
}
