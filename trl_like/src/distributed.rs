//! Data-parallel training over libtorch's c10d process groups (what
//! `torch.distributed` uses): Gloo on CPU, NCCL on CUDA, a TCPStore for the
//! rendezvous, and processes launched by `torchrun`.
//!
//! tch does not bind c10d, so `csrc/c10d_shim.cpp` exposes the calls the trainer
//! needs (create, all-reduce, broadcast, barrier, reduce-scatter, all-gather,
//! destroy) as a C interface; this module is the only Rust code that calls it. Every C++
//! exception comes back as a [`DistError::Collective`] naming the operation.
//!
//! The launch contract is torchrun's: `RANK`, `WORLD_SIZE`, `LOCAL_RANK`,
//! `LOCAL_WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT`. Under torchrun the
//! elastic agent already hosts the TCPStore (`TORCHELASTIC_USE_AGENT_STORE`),
//! so every rank connects as a client, in the key space of the current restart
//! attempt, as `torch.distributed.init_process_group("env://")` does; without
//! the agent, rank 0 hosts the store.

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::time::Duration;
use tch::{Device, Kind, Tensor};

/// Why a process group could not be set up or a collective failed.
#[derive(Debug, thiserror::Error)]
pub enum DistError {
    #[error("environment variable {name}={value:?}: {message}")]
    Env {
        name: &'static str,
        value: String,
        message: String,
    },
    #[error("environment variable {0} is required for distributed training (set by torchrun)")]
    MissingEnv(&'static str),
    #[error("--ddp_backend {0:?} is not one of nccl, gloo")]
    Backend(String),
    #[error("distributed {op} failed on rank {rank} of {world_size}: {message}")]
    Collective {
        op: &'static str,
        rank: usize,
        world_size: usize,
        message: String,
    },
}

/// A c10d backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// CPU tensors (and the CPU tests).
    Gloo,
    /// CUDA tensors, one GPU per process.
    Nccl,
}

impl Backend {
    /// `--ddp_backend`: `nccl` / `gloo`; unset picks nccl on CUDA, gloo on CPU (transformers' rule).
    pub fn resolve(name: Option<&str>, device: Device) -> Result<Self, DistError> {
        match name.map(str::to_ascii_lowercase).as_deref() {
            None | Some("") => Ok(if device.is_cuda() {
                Backend::Nccl
            } else {
                Backend::Gloo
            }),
            Some("gloo") => Ok(Backend::Gloo),
            Some("nccl") => Ok(Backend::Nccl),
            Some(other) => Err(DistError::Backend(other.to_string())),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Backend::Gloo => "gloo",
            Backend::Nccl => "nccl",
        }
    }

    /// Whether this build can create the backend (NCCL needs CUDA headers at build time).
    pub fn is_available(self) -> bool {
        match self {
            Backend::Gloo => true,
            // SAFETY: a pure function of how the shim was compiled.
            Backend::Nccl => unsafe { trl_c10d_has_nccl() != 0 },
        }
    }
}

/// Where this process sits in a torchrun launch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DistEnv {
    pub rank: usize,
    pub world_size: usize,
    pub local_rank: usize,
    pub local_world_size: usize,
    pub master_addr: String,
    pub master_port: u16,
    /// torchrun's agent hosts the store (`TORCHELASTIC_USE_AGENT_STORE=True`).
    pub use_agent_store: bool,
    /// `TORCHELASTIC_RESTART_COUNT`: keys of a restarted attempt do not see the old ones.
    pub restart_count: usize,
}

impl DistEnv {
    /// Reads torchrun's variables. `None` when `WORLD_SIZE` is unset (a plain
    /// single-process run); `WORLD_SIZE=1` is a real one-rank process group.
    pub fn from_env() -> Result<Option<Self>, DistError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// [`from_env`](Self::from_env) over any variable source (tests).
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Option<Self>, DistError> {
        let Some(world) = get("WORLD_SIZE") else {
            return Ok(None);
        };
        let number = |name: &'static str, value: String| -> Result<usize, DistError> {
            value.trim().parse::<usize>().map_err(|_| DistError::Env {
                name,
                value,
                message: "expected a non-negative integer".into(),
            })
        };
        let world_size = number("WORLD_SIZE", world.clone())?;
        if world_size == 0 {
            return Err(DistError::Env {
                name: "WORLD_SIZE",
                value: world,
                message: "must be at least 1".into(),
            });
        }
        let required = |name: &'static str| get(name).ok_or(DistError::MissingEnv(name));
        let rank = number("RANK", required("RANK")?)?;
        if rank >= world_size {
            return Err(DistError::Env {
                name: "RANK",
                value: rank.to_string(),
                message: format!("must be below WORLD_SIZE ({world_size})"),
            });
        }
        let local_rank = match get("LOCAL_RANK") {
            Some(v) => number("LOCAL_RANK", v)?,
            None => rank,
        };
        let local_world_size = match get("LOCAL_WORLD_SIZE") {
            Some(v) => number("LOCAL_WORLD_SIZE", v)?,
            None => world_size,
        };
        let master_addr = required("MASTER_ADDR")?;
        let port_text = required("MASTER_PORT")?;
        let master_port = port_text
            .trim()
            .parse::<u16>()
            .ok()
            .filter(|&p| p > 0)
            .ok_or(DistError::Env {
                name: "MASTER_PORT",
                value: port_text,
                message: "expected a TCP port (1-65535)".into(),
            })?;
        let use_agent_store = get("TORCHELASTIC_USE_AGENT_STORE")
            .is_some_and(|v| v.eq_ignore_ascii_case("true") || v == "1");
        let restart_count = match get("TORCHELASTIC_RESTART_COUNT") {
            Some(v) => number("TORCHELASTIC_RESTART_COUNT", v)?,
            None => 0,
        };
        Ok(Some(Self {
            rank,
            world_size,
            local_rank,
            local_world_size,
            master_addr,
            master_port,
            use_agent_store,
            restart_count,
        }))
    }
}

/// How an all-reduce combines the ranks' values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReduceOp {
    Sum = 0,
    Max = 1,
    Min = 2,
}

extern "C" {
    #[allow(clippy::too_many_arguments)]
    fn trl_c10d_new(
        backend: *const c_char,
        host: *const c_char,
        port: u16,
        rank: c_int,
        world_size: c_int,
        is_server: c_int,
        prefix: *const c_char,
        timeout_ms: i64,
        cuda_device: c_int,
        error: *mut *mut c_char,
    ) -> *mut c_void;
    fn trl_c10d_has_nccl() -> c_int;
    fn trl_c10d_all_reduce(
        group: *mut c_void,
        tensor: *mut c_void,
        op: c_int,
        error: *mut *mut c_char,
    ) -> c_int;
    fn trl_c10d_broadcast(
        group: *mut c_void,
        tensor: *mut c_void,
        root: c_int,
        error: *mut *mut c_char,
    ) -> c_int;
    fn trl_c10d_barrier(group: *mut c_void, error: *mut *mut c_char) -> c_int;
    fn trl_c10d_reduce_scatter(
        group: *mut c_void,
        output: *mut c_void,
        input: *mut c_void,
        error: *mut *mut c_char,
    ) -> c_int;
    fn trl_c10d_all_gather(
        group: *mut c_void,
        output: *mut c_void,
        input: *mut c_void,
        error: *mut *mut c_char,
    ) -> c_int;
    fn trl_c10d_free(group: *mut c_void);
    fn trl_c10d_free_error(error: *mut c_char);
}

/// Takes ownership of a message the shim allocated.
fn take_error(error: *mut c_char) -> String {
    if error.is_null() {
        return "unknown error".into();
    }
    // SAFETY: the shim returns a NUL-terminated malloc'd string, freed right after copying.
    let text = unsafe { CStr::from_ptr(error) }
        .to_string_lossy()
        .trim()
        .to_string();
    unsafe { trl_c10d_free_error(error) };
    text
}

/// A live c10d process group (the default group of `torch.distributed`).
pub struct ProcessGroup {
    raw: *mut c_void,
    rank: usize,
    world_size: usize,
    local_rank: usize,
    backend: Backend,
}

// The C++ process group is thread-safe; the handle is only a pointer to it.
unsafe impl Send for ProcessGroup {}
unsafe impl Sync for ProcessGroup {}

impl std::fmt::Debug for ProcessGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProcessGroup")
            .field("backend", &self.backend)
            .field("rank", &self.rank)
            .field("world_size", &self.world_size)
            .finish()
    }
}

impl ProcessGroup {
    /// Rendezvous through the TCPStore at `MASTER_ADDR:MASTER_PORT` and create
    /// the group. Blocks until all `world_size` ranks have joined or `timeout`
    /// passes (transformers' `ddp_timeout`).
    /// An NCCL group drives `cuda:LOCAL_RANK` (made the current device).
    pub fn init(env: &DistEnv, backend: Backend, timeout: Duration) -> Result<Self, DistError> {
        let fail = |message: String| DistError::Collective {
            op: "init_process_group",
            rank: env.rank,
            world_size: env.world_size,
            message,
        };
        let cstr = |s: &str| CString::new(s).map_err(|_| fail(format!("{s:?} contains NUL")));
        let backend_name = cstr(backend.name())?;
        let host = cstr(&env.master_addr)?;
        let prefix = cstr(&format!(
            "/worker/attempt_{}/trl_like/default_pg/",
            env.restart_count
        ))?;
        let is_server = !env.use_agent_store && env.rank == 0;
        let mut error: *mut c_char = std::ptr::null_mut();
        // SAFETY: all strings outlive the call; the shim catches every C++ exception.
        let raw = unsafe {
            trl_c10d_new(
                backend_name.as_ptr(),
                host.as_ptr(),
                env.master_port,
                env.rank as c_int,
                env.world_size as c_int,
                is_server as c_int,
                prefix.as_ptr(),
                timeout.as_millis().min(i64::MAX as u128) as i64,
                env.local_rank as c_int,
                &mut error,
            )
        };
        if raw.is_null() {
            return Err(fail(format!(
                "{} (rendezvous at {}:{})",
                take_error(error),
                env.master_addr,
                env.master_port
            )));
        }
        Ok(Self {
            raw,
            rank: env.rank,
            world_size: env.world_size,
            local_rank: env.local_rank,
            backend,
        })
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn world_size(&self) -> usize {
        self.world_size
    }

    pub fn local_rank(&self) -> usize {
        self.local_rank
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    fn check(&self, op: &'static str, status: c_int, error: *mut c_char) -> Result<(), DistError> {
        if status == 0 {
            return Ok(());
        }
        Err(DistError::Collective {
            op,
            rank: self.rank,
            world_size: self.world_size,
            message: take_error(error),
        })
    }

    /// Combines `tensor` across ranks in place (every rank ends with the result).
    /// The tensor must be contiguous and on this backend's device.
    pub fn all_reduce(&self, tensor: &mut Tensor, op: ReduceOp) -> Result<(), DistError> {
        let mut error = std::ptr::null_mut();
        // SAFETY: `tensor` is a live torch::Tensor for the duration of the call.
        let status = unsafe {
            trl_c10d_all_reduce(
                self.raw,
                tensor.as_mut_ptr() as *mut c_void,
                op as c_int,
                &mut error,
            )
        };
        self.check("all_reduce", status, error)
    }

    /// Overwrites `tensor` on every rank with rank `root`'s values.
    pub fn broadcast(&self, tensor: &mut Tensor, root: usize) -> Result<(), DistError> {
        let mut error = std::ptr::null_mut();
        // SAFETY: as in all_reduce.
        let status = unsafe {
            trl_c10d_broadcast(
                self.raw,
                tensor.as_mut_ptr() as *mut c_void,
                root as c_int,
                &mut error,
            )
        };
        self.check("broadcast", status, error)
    }

    /// Waits until every rank has reached the barrier.
    pub fn barrier(&self) -> Result<(), DistError> {
        let mut error = std::ptr::null_mut();
        // SAFETY: the handle is live until drop.
        let status = unsafe { trl_c10d_barrier(self.raw, &mut error) };
        self.check("barrier", status, error)
    }

    /// Sums `input` (world_size equal pieces, contiguous) across ranks and
    /// leaves piece `rank` of the sum in `output` (torch's `reduce_scatter_tensor`).
    pub fn reduce_scatter(&self, output: &mut Tensor, input: &Tensor) -> Result<(), DistError> {
        let expected = output.numel() * self.world_size;
        if input.numel() != expected {
            return Err(self.shape_error(
                "reduce_scatter",
                format!(
                    "input has {} values, expected {} (output {} x world size {})",
                    input.numel(),
                    expected,
                    output.numel(),
                    self.world_size
                ),
            ));
        }
        let mut input = input.shallow_clone();
        let mut error = std::ptr::null_mut();
        // SAFETY: both tensors are live torch::Tensors for the duration of the call.
        let status = unsafe {
            trl_c10d_reduce_scatter(
                self.raw,
                output.as_mut_ptr() as *mut c_void,
                input.as_mut_ptr() as *mut c_void,
                &mut error,
            )
        };
        self.check("reduce_scatter", status, error)
    }

    /// Concatenates every rank's `input` (equal sizes) into `output`, rank by
    /// rank (torch's `all_gather_into_tensor`).
    pub fn all_gather(&self, output: &mut Tensor, input: &Tensor) -> Result<(), DistError> {
        let expected = input.numel() * self.world_size;
        if output.numel() != expected {
            return Err(self.shape_error(
                "all_gather",
                format!(
                    "output has {} values, expected {} (input {} x world size {})",
                    output.numel(),
                    expected,
                    input.numel(),
                    self.world_size
                ),
            ));
        }
        let mut input = input.shallow_clone();
        let mut error = std::ptr::null_mut();
        // SAFETY: as in reduce_scatter.
        let status = unsafe {
            trl_c10d_all_gather(
                self.raw,
                output.as_mut_ptr() as *mut c_void,
                input.as_mut_ptr() as *mut c_void,
                &mut error,
            )
        };
        self.check("all_gather", status, error)
    }

    fn shape_error(&self, op: &'static str, message: String) -> DistError {
        DistError::Collective {
            op,
            rank: self.rank,
            world_size: self.world_size,
            message,
        }
    }

    /// All-reduces a few host numbers (metrics, flags) in one collective.
    pub fn all_reduce_f64(&self, values: &mut [f64], op: ReduceOp) -> Result<(), DistError> {
        let device = self.collective_device();
        let mut t = Tensor::from_slice(values).to_device(device);
        self.all_reduce(&mut t, op)?;
        let out: Vec<f64> =
            Vec::<f64>::try_from(t.to_device(Device::Cpu)).map_err(|e| DistError::Collective {
                op: "all_reduce",
                rank: self.rank,
                world_size: self.world_size,
                message: e.to_string(),
            })?;
        values.copy_from_slice(&out);
        Ok(())
    }

    /// Sums the gradients of `params` across ranks in place, in flat buckets
    /// of at most [`BUCKET_BYTES`] per dtype (DDP's `bucket_cap_mb`), then
    /// scales them by `scale`. A parameter without a gradient contributes zeros.
    pub fn all_reduce_gradients(&self, params: &[Tensor], scale: f64) -> Result<(), DistError> {
        let mut bucket: Vec<Tensor> = Vec::new();
        let mut bytes = 0usize;
        let mut bucket_kind: Option<Kind> = None;
        for p in params {
            let mut grad = p.grad();
            if !grad.defined() {
                // A zero gradient keeps every rank's buckets the same shape
                // (tch cannot assign `.grad`; a zero backward creates it).
                (p * 0.0).sum(Kind::Float).backward();
                grad = p.grad();
            }
            let kind = grad.kind();
            let size = grad.numel() * kind.elt_size_in_bytes();
            if !bucket.is_empty() && (bucket_kind != Some(kind) || bytes + size > BUCKET_BYTES) {
                self.reduce_bucket(&std::mem::take(&mut bucket), scale)?;
                bytes = 0;
            }
            bucket_kind = Some(kind);
            bytes += size;
            bucket.push(grad);
        }
        if !bucket.is_empty() {
            self.reduce_bucket(&bucket, scale)?;
        }
        Ok(())
    }

    fn reduce_bucket(&self, grads: &[Tensor], scale: f64) -> Result<(), DistError> {
        let mut flat = Tensor::cat(
            &grads.iter().map(|g| g.reshape([-1])).collect::<Vec<_>>(),
            0,
        );
        self.all_reduce(&mut flat, ReduceOp::Sum)?;
        if scale != 1.0 {
            flat *= scale;
        }
        tch::no_grad(|| {
            let mut offset = 0;
            for g in grads {
                let n = g.numel() as i64;
                let mut g = g.shallow_clone();
                g.copy_(&flat.narrow(0, offset, n).view_as(&g));
                offset += n;
            }
        });
        Ok(())
    }

    /// Makes every rank's `params` equal to rank 0's (DDP does this at start).
    pub fn broadcast_parameters(&self, params: &[Tensor]) -> Result<(), DistError> {
        for p in params {
            let mut data = p.detach();
            tch::no_grad(|| self.broadcast(&mut data, 0))?;
        }
        Ok(())
    }

    /// The device collectives of this backend run on (the current CUDA device for NCCL).
    fn collective_device(&self) -> Device {
        match self.backend {
            Backend::Gloo => Device::Cpu,
            Backend::Nccl => Device::Cuda(self.local_rank),
        }
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        // SAFETY: `raw` came from trl_c10d_new and is freed exactly once.
        unsafe { trl_c10d_free(self.raw) };
    }
}

/// Gradient bucket size of [`ProcessGroup::all_reduce_gradients`]: 25 MB, DDP's default.
pub const BUCKET_BYTES: usize = 25 * 1024 * 1024;

/// The share of `items` that `rank` of `world_size` takes: item `i` goes to
/// rank `i % world_size`, the list first extended by cycling from its start
/// until it divides evenly so every rank runs the same number of steps
/// (accelerate's `even_batches` sharding of a batch sampler).
pub fn shard_round_robin<T: Clone>(items: &[T], rank: usize, world_size: usize) -> Vec<T> {
    if world_size <= 1 || items.is_empty() {
        return items.to_vec();
    }
    let per_rank = items.len().div_ceil(world_size);
    (0..per_rank)
        .map(|k| items[(k * world_size + rank) % items.len()].clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(vars: &[(&str, &str)]) -> Result<Option<DistEnv>, DistError> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        DistEnv::from_lookup(|k| map.get(k).cloned())
    }

    #[test]
    fn reads_torchrun_variables() {
        let e = env(&[
            ("WORLD_SIZE", "4"),
            ("RANK", "3"),
            ("LOCAL_RANK", "1"),
            ("LOCAL_WORLD_SIZE", "2"),
            ("MASTER_ADDR", "10.0.0.1"),
            ("MASTER_PORT", "29500"),
            ("TORCHELASTIC_USE_AGENT_STORE", "True"),
            ("TORCHELASTIC_RESTART_COUNT", "2"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!((e.rank, e.world_size, e.local_rank), (3, 4, 1));
        assert_eq!(e.local_world_size, 2);
        assert_eq!((e.master_addr.as_str(), e.master_port), ("10.0.0.1", 29500));
        assert!(e.use_agent_store);
        assert_eq!(e.restart_count, 2);
        assert_eq!(env(&[]).unwrap(), None);
    }

    #[test]
    fn bad_variables_are_named() {
        let base = [("MASTER_ADDR", "localhost"), ("MASTER_PORT", "29500")];
        let with = |extra: &[(&'static str, &'static str)]| {
            let mut v = base.to_vec();
            v.extend_from_slice(extra);
            env(&v).unwrap_err().to_string()
        };
        assert!(with(&[("WORLD_SIZE", "two"), ("RANK", "0")]).contains("WORLD_SIZE"));
        assert!(with(&[("WORLD_SIZE", "2"), ("RANK", "2")]).contains("below WORLD_SIZE"));
        assert!(with(&[("WORLD_SIZE", "2")]).contains("RANK is required"));
        let e = env(&[
            ("WORLD_SIZE", "2"),
            ("RANK", "0"),
            ("MASTER_ADDR", "x"),
            ("MASTER_PORT", "0"),
        ])
        .unwrap_err();
        assert!(e.to_string().contains("MASTER_PORT"), "{e}");
    }

    #[test]
    fn backend_names() {
        assert_eq!(Backend::resolve(None, Device::Cpu).unwrap(), Backend::Gloo);
        assert_eq!(
            Backend::resolve(None, Device::Cuda(0)).unwrap(),
            Backend::Nccl
        );
        assert_eq!(
            Backend::resolve(Some("GLOO"), Device::Cuda(0)).unwrap(),
            Backend::Gloo
        );
        assert!(Backend::resolve(Some("mpi"), Device::Cpu)
            .unwrap_err()
            .to_string()
            .contains("mpi"));
    }

    #[test]
    fn round_robin_shards_cover_everything_evenly() {
        let items: Vec<usize> = (0..5).collect();
        let r0 = shard_round_robin(&items, 0, 2);
        let r1 = shard_round_robin(&items, 1, 2);
        assert_eq!(r0, vec![0, 2, 4]);
        // Rank 1 is topped up from the start, as accelerate's even_batches does.
        assert_eq!(r1, vec![1, 3, 0]);
        assert_eq!(shard_round_robin(&items, 0, 1), items);
    }

    #[test]
    fn one_rank_group_reduces_in_place() {
        // A real Gloo group of one rank on a free local port.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let env = DistEnv {
            rank: 0,
            world_size: 1,
            local_rank: 0,
            local_world_size: 1,
            master_addr: "127.0.0.1".into(),
            master_port: port,
            use_agent_store: false,
            restart_count: 0,
        };
        let pg = ProcessGroup::init(&env, Backend::Gloo, Duration::from_secs(30)).unwrap();
        let mut t = Tensor::from_slice(&[1.0f32, 2.0, 3.0]);
        pg.all_reduce(&mut t, ReduceOp::Sum).unwrap();
        assert_eq!(Vec::<f32>::try_from(&t).unwrap(), vec![1.0, 2.0, 3.0]);
        let mut v = [2.5, -1.0];
        pg.all_reduce_f64(&mut v, ReduceOp::Max).unwrap();
        assert_eq!(v, [2.5, -1.0]);
        pg.barrier().unwrap();
        let mut shard = Tensor::zeros([3], (Kind::Float, Device::Cpu));
        pg.reduce_scatter(&mut shard, &t).unwrap();
        assert_eq!(Vec::<f32>::try_from(&shard).unwrap(), vec![1.0, 2.0, 3.0]);
        let mut gathered = Tensor::zeros([3], (Kind::Float, Device::Cpu));
        pg.all_gather(&mut gathered, &shard).unwrap();
        assert_eq!(
            Vec::<f32>::try_from(&gathered).unwrap(),
            vec![1.0, 2.0, 3.0]
        );
        let mut wrong = Tensor::zeros([2], (Kind::Float, Device::Cpu));
        let e = pg.reduce_scatter(&mut wrong, &t).unwrap_err();
        assert!(e.to_string().contains("reduce_scatter"), "{e}");
        let mut b = Tensor::from_slice(&[7i64]);
        pg.broadcast(&mut b, 0).unwrap();
        assert_eq!(b.int64_value(&[0]), 7);
        // NCCL is refused clearly when this build lacks it (and on CPU-only machines).
        if !Backend::Nccl.is_available() {
            let err = ProcessGroup::init(&env, Backend::Nccl, Duration::from_secs(5)).unwrap_err();
            assert!(err.to_string().contains("NCCL"), "{err}");
        }
    }
}
