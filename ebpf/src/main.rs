//! fanout's kernel side: the TCP lifecycle tracer.
//!
//! * `sock/inet_sock_set_state` turns state transitions into lifecycle records (connect,
//!   established, passive open, failed connect, close) and remembers per-socket owner, start
//!   time and counters: for client ends in `SOCKS`, keyed by socket address, where the daemon's
//!   sampler reads them live; for server ends, in the BTF-typed form, in `SERVER_ENDS`, kept with
//!   the socket (socket-local storage, which only BTF-typed programs reach).
//! * `sock/sock_{send,recv}_length` count payload bytes and calls, and name a passively opened
//!   socket's owner: the task of its first read or write (kept in `SOCKS`; in the BTF-typed
//!   form, where it lives in socket storage user space cannot read, an `Accepted` record).
//! * `syscalls/sys_exit_accept{,4}`, only where the length hooks are missing, runs in the
//!   accepting task's context, finds the returned socket through the task's file table and
//!   records the owner of a passively opened socket.
//! * `h2_egress` (cgroup_skb) counts HTTP/2 requests in the egress of client sockets, its state
//!   kept with the socket (`SLOTS`), its figure mirrored into `SOCKS`.
//!
//! Every layout the programs read (tracepoint fields, kernel struct members) comes from `CONFIG`,
//! which the daemon fills from tracefs and BTF at load time.
#![no_std]
#![no_main]
// The BPF target has no compare-and-swap, so `AtomicU64::fetch_add` does not exist there; the
// intrinsic lowers to BPF's native atomic add.
#![allow(internal_features)]
#![feature(core_intrinsics)]

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use core::ffi::c_void;

use aya_ebpf::{
    EbpfContext,
    bindings::bpf_sock,
    btf_maps::SkStorage,
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_task, bpf_ktime_get_ns,
        bpf_probe_read_kernel, bpf_sk_fullsock, bpf_skb_load_bytes,
        generated::{bpf_sk_storage_delete, bpf_sk_storage_get},
    },
    macros::{btf_map, btf_tracepoint, cgroup_skb, map, raw_tracepoint, tracepoint},
    maps::{HashMap, PerCpuArray, RingBuf},
    programs::{BtfTracePointContext, RawTracePointContext, SkBuffContext, TracePointContext},
};
use aya_log_ebpf::{debug, warn};
use fanout_common::{
    Config, LostReason, Record, RecordKind, SockState,
    h2::H2Scan,
    tcp::{AF_INET, AF_INET6, IPPROTO_TCP, classify},
};

const BPF_RB_AVAIL_DATA: u64 = 0;
const BPF_RB_NO_WAKEUP: u64 = 1;
const BPF_RB_FORCE_WAKEUP: u64 = 2;

/// Filled by the daemon before load (read-only data section).
#[unsafe(no_mangle)]
static CONFIG: Config = Config::zeroed();

/// Lifecycle records for user space. The daemon sets the real size at load time.
#[map]
static RECORDS: RingBuf = RingBuf::with_byte_size(4 << 20, 0);

/// `BPF_F_NO_PREALLOC`: entries are allocated as sockets come, so the map costs what is live, not
/// its capacity.
const BPF_F_NO_PREALLOC: u32 = 1;

/// Socket address → owner and start time, from connect/passive open until close.
#[map]
static SOCKS: HashMap<u64, SockState> = HashMap::with_max_entries(65536, BPF_F_NO_PREALLOC);

/// The HTTP/2 scanner's state of a client socket's egress, kept with the socket
/// (`BPF_MAP_TYPE_SK_STORAGE`): the scanner reaches it from the packet's socket with no key to
/// derive (no addresses, which NAT in the client's namespace may have rewritten: a hostNetwork
/// pod calling a ClusterIP sends packets that already carry the backend's address while its
/// socket names the ClusterIP), and the kernel frees it with the socket, so nothing outlives a
/// connection whose close was missed. Made at a connection's first payload when that opens
/// HTTP/2; other connections never get one.
#[btf_map]
static SLOTS: SkStorage<H2Scan> = SkStorage::new();

/// The state of a server end (passive open to close), kept with the socket by the BTF-typed
/// hooks: no hash insert at the open, no delete at the close, a lookup without hashing at each
/// read and write. Server ends are not sampled live (their figures come with the close), so no
/// user-space reader needs them by address as it does client ends' `SOCKS` entries.
#[btf_map]
static SERVER_ENDS: SkStorage<SockState> = SkStorage::new();

/// `BPF_SK_STORAGE_GET_F_CREATE`
const SK_STORAGE_CREATE: u64 = 1;

/// `storage`'s value for socket `sk` (a pointer the verifier knows as a socket), made zeroed when
/// `create` and missing. None when missing and not made, or when the kernel could not allocate
/// it. Valid for the rest of the program run (the 'static is this run's).
#[inline(always)]
fn stored<T>(storage: *const c_void, sk: *mut c_void, create: bool) -> Option<&'static mut T> {
    let flags = if create { SK_STORAGE_CREATE } else { 0 };
    // SAFETY: helper call with a socket-storage map and a socket pointer; it returns NULL or a
    // pointer to the socket's value of the map's value type.
    unsafe {
        let p = bpf_sk_storage_get(storage as *mut c_void, sk, core::ptr::null_mut(), flags);
        (p as *mut T).as_mut()
    }
}

/// The server-end state of socket `sk`, if it has one.
#[inline(always)]
fn server_end(sk: *mut c_void) -> Option<&'static mut SockState> {
    stored(core::ptr::addr_of!(SERVER_ENDS).cast(), sk, false)
}

/// Per-CPU loss counters, indexed by `LostReason`.
#[map]
static LOST: PerCpuArray<u64> = PerCpuArray::with_max_entries(LostReason::COUNT, 0);

#[inline(always)]
fn config() -> Config {
    // SAFETY: CONFIG is a plain global; the volatile read keeps the compiler from folding the
    // zeroed initialiser the loader overwrites.
    unsafe { core::ptr::read_volatile(&CONFIG) }
}

#[inline(always)]
fn count_lost(reason: LostReason) {
    if let Some(counter) = LOST.get_ptr_mut(reason as u32) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU while the program runs.
        unsafe { *counter += 1 };
    }
}

/// Keeps `st` as socket `sk`'s state; false when the map is full (counted and logged).
#[inline(always)]
fn remember<C: EbpfContext>(ctx: &C, sk: u64, st: &SockState) -> bool {
    if SOCKS.insert(sk, st, 0).is_err() {
        count_lost(LostReason::SockMapFull);
        warn!(
            ctx,
            "fanout: socket state map full; owner and duration will be missing"
        );
        return false;
    }
    true
}

#[inline(always)]
fn emit(rec: &Record, wakeup_bytes: u64) {
    let flags = if RECORDS.query(BPF_RB_AVAIL_DATA) >= wakeup_bytes {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    };
    match RECORDS.reserve::<Record>(0) {
        Some(mut entry) => {
            entry.write(*rec);
            entry.submit(flags);
        }
        None => count_lost(LostReason::RingFull),
    }
}

#[inline(always)]
fn owner_from_state(rec: &mut Record, st: &SockState) {
    if st.flags & Record::FLAG_OWNER_KNOWN as u32 != 0 {
        rec.tgid = st.tgid;
        rec.tid = st.tid;
        rec.comm = st.comm;
        rec.flags |= Record::FLAG_OWNER_KNOWN;
    }
}

/// `sk->__sk_common.skc_net.net->ns.inum`
#[inline(always)]
fn netns_of(sk: u64, cfg: &Config) -> u32 {
    // SAFETY: bpf_probe_read_kernel tolerates bad addresses and reports an error instead.
    let net: Result<u64, i32> =
        unsafe { bpf_probe_read_kernel((sk + cfg.offsets.sock_net as u64) as *const u64) };
    let inum = match net {
        Ok(net) if net != 0 => unsafe {
            bpf_probe_read_kernel((net + cfg.offsets.net_inum as u64) as *const u32)
        },
        _ => Err(-1),
    };
    match inum {
        Ok(v) => v,
        Err(_) => {
            count_lost(LostReason::KernelRead);
            0
        }
    }
}

#[tracepoint(category = "sock", name = "inet_sock_set_state")]
pub fn inet_sock_set_state(ctx: TracePointContext) -> u32 {
    // Errors here are failed reads of the tracepoint record itself; there is nothing to report.
    let _ = try_set_state(&ctx);
    0
}

/// The classic tracepoint: every field comes from the trace record, one helper call each.
fn try_set_state(ctx: &TracePointContext) -> Result<(), i32> {
    let cfg = config();
    let tp = cfg.tp;
    // SAFETY (all read_at calls): offsets come from the tracepoint's own format file.
    let protocol: u16 = unsafe { ctx.read_at(tp.protocol as usize)? };
    if protocol != IPPROTO_TCP {
        return Ok(());
    }
    let oldstate: i32 = unsafe { ctx.read_at(tp.oldstate as usize)? };
    let newstate: i32 = unsafe { ctx.read_at(tp.newstate as usize)? };
    let Some(kind) = classify(oldstate, newstate) else {
        return Ok(());
    };
    let sk: u64 = unsafe { ctx.read_at(tp.skaddr as usize)? };
    let family: u16 = unsafe { ctx.read_at(tp.family as usize)? };

    let mut rec = Record::zeroed();
    rec.sport = unsafe { ctx.read_at(tp.sport as usize)? };
    rec.dport = unsafe { ctx.read_at(tp.dport as usize)? };
    // SAFETY (read_at): as above.
    let known = addresses(
        &mut rec,
        family,
        || unsafe {
            Ok((
                ctx.read_at(tp.saddr as usize)?,
                ctx.read_at(tp.daddr as usize)?,
            ))
        },
        || unsafe {
            Ok((
                ctx.read_at(tp.saddr_v6 as usize)?,
                ctx.read_at(tp.daddr_v6 as usize)?,
            ))
        },
    )?;
    if !known {
        return Ok(());
    }
    lifecycle(ctx, &cfg, kind, sk, rec)
}

#[raw_tracepoint(tracepoint = "inet_sock_set_state")]
pub fn inet_sock_set_state_raw(ctx: RawTracePointContext) -> i32 {
    // Errors here are failed reads of the socket; there is nothing to report.
    let _ = try_set_state_raw(&ctx);
    0
}

/// Reads `*(base + off)` from kernel memory.
#[inline(always)]
fn read_kernel<T>(base: u64, off: u16) -> Result<T, i32> {
    // SAFETY: bpf_probe_read_kernel tolerates bad addresses and reports an error instead.
    unsafe { bpf_probe_read_kernel((base + off as u64) as *const T) }
}

/// The raw tracepoint (`TP_PROTO(const struct sock *sk, int oldstate, int newstate)`): the
/// kernel builds no trace record, and the states are plain loads from the arguments, so the
/// transitions fanout ignores (4 of the 10 runs of a short connection) cost a few instructions.
/// The socket's fields are read only for the ones it reports.
fn try_set_state_raw(ctx: &RawTracePointContext) -> Result<(), i32> {
    let sk: u64 = ctx.arg(0);
    let cfg = config();
    let Some((kind, rec)) =
        transition(&cfg, sk, ctx.arg::<u64>(1) as i32, ctx.arg::<u64>(2) as i32)?
    else {
        return Ok(());
    };
    lifecycle(ctx, &cfg, kind, sk, rec)
}

/// What the raw and the BTF-typed lifecycle hooks share: the transition of socket `sk` from
/// `oldstate` to `newstate` as a record (addresses and ports read from the socket), or None for
/// the transitions and sockets fanout ignores, decided before any read of the socket it can.
#[inline(always)]
fn transition(
    cfg: &Config,
    sk: u64,
    oldstate: i32,
    newstate: i32,
) -> Result<Option<(RecordKind, Record)>, i32> {
    let Some(kind) = classify(oldstate, newstate) else {
        return Ok(None);
    };
    let off = cfg.sk;
    if read_kernel::<u16>(sk, off.protocol)? != IPPROTO_TCP {
        return Ok(None);
    }
    let family: u16 = read_kernel(sk, off.family)?;
    let mut rec = Record::zeroed();
    rec.sport = u16::from_be(read_kernel(sk, off.sport)?);
    rec.dport = u16::from_be(read_kernel(sk, off.dport)?);
    let known = addresses(
        &mut rec,
        family,
        || Ok((read_kernel(sk, off.saddr)?, read_kernel(sk, off.daddr)?)),
        || {
            Ok((
                read_kernel(sk, off.v6_rcv_saddr)?,
                read_kernel(sk, off.v6_daddr)?,
            ))
        },
    )?;
    Ok(known.then_some((kind, rec)))
}

/// Fills the record's addresses for `family` from the (source, destination) pair that `v4` or
/// `v6` reads; false for a family that is neither (nothing to report).
#[inline(always)]
fn addresses(
    rec: &mut Record,
    family: u16,
    v4: impl FnOnce() -> Result<([u8; 4], [u8; 4]), i32>,
    v6: impl FnOnce() -> Result<([u8; 16], [u8; 16]), i32>,
) -> Result<bool, i32> {
    if family == AF_INET {
        let (s, d) = v4()?;
        rec.ip_version = 4;
        rec.saddr[..4].copy_from_slice(&s);
        rec.daddr[..4].copy_from_slice(&d);
    } else if family == AF_INET6 {
        (rec.saddr, rec.daddr) = v6()?;
        rec.ip_version = 6;
    } else {
        return Ok(false);
    }
    Ok(true)
}

/// What both forms of the lifecycle hook do with a transition they report: `rec` carries the
/// addresses and ports; this adds time, socket, namespace, owner and counters, keeps `SOCKS` in
/// step, and emits. The namespace is read from the socket once, when its state is made, and
/// taken from that state afterwards.
#[inline(always)]
fn lifecycle<C: EbpfContext>(
    ctx: &C,
    cfg: &Config,
    kind: RecordKind,
    sk: u64,
    mut rec: Record,
) -> Result<(), i32> {
    match kind {
        RecordKind::Connect => {
            // Process context: the connecting task owns the socket. The owner travels in the
            // socket's state to the established or failed record; a connect record of its own
            // is emitted only when that state could not be kept, so that the owner still
            // reaches user space (one record fewer per connection otherwise).
            let mut st = SockState::started(0);
            take_owner(&mut st);
            st.netns = netns_of(sk, cfg);
            if remember(ctx, sk, &st) {
                return Ok(());
            }
            owner_from_state(&mut rec, &st);
            stamp_as(&mut rec, kind, sk, st.netns);
        }
        RecordKind::Established => match SOCKS.get_ptr_mut(sk) {
            Some(st) => {
                // SAFETY: map value pointer from a successful lookup.
                let st = unsafe { &mut *st };
                stamp_as(&mut rec, kind, sk, netns_in(st, sk, cfg));
                st.start_ns = rec.ts_ns;
                owner_from_state(&mut rec, st);
            }
            None => {
                stamp(&mut rec, cfg, kind, sk);
                let mut st = SockState::started(rec.ts_ns);
                st.netns = rec.netns;
                let _ = remember(ctx, sk, &st);
            }
        },
        RecordKind::PassiveOpen => {
            // Usually softirq context: the current task is not the owner; its first read or
            // write tells (or accept(), where the length hooks are missing).
            stamp(&mut rec, cfg, kind, sk);
            let mut st = SockState::passive(rec.ts_ns);
            st.netns = rec.netns;
            let _ = remember(ctx, sk, &st);
        }
        RecordKind::ConnectFailed | RecordKind::Close => {
            // Only the client end of an established connection has an HTTP/2 figure.
            let dialled = kind == RecordKind::Close;
            match SOCKS.get_ptr(sk) {
                Some(st) => {
                    // SAFETY: map value pointer from a successful lookup; copied before removal.
                    let st = unsafe { &*st };
                    stamp_as(&mut rec, kind, sk, netns_in(st, sk, cfg));
                    closing(&mut rec, st, dialled);
                    let _ = SOCKS.remove(sk);
                }
                None => stamp(&mut rec, cfg, kind, sk),
            }
        }
        RecordKind::Accepted => stamp(&mut rec, cfg, kind, sk),
    }
    emit(&rec, cfg.wakeup_bytes);
    Ok(())
}

/// The namespace a socket's state remembers, or read from the socket where it does not.
#[inline(always)]
fn netns_in(st: &SockState, sk: u64, cfg: &Config) -> u32 {
    if st.netns != 0 {
        st.netns
    } else {
        netns_of(sk, cfg)
    }
}

/// Time, socket, kind and the namespace `netns` of a record about to be emitted for socket `sk`.
#[inline(always)]
fn stamp_as(rec: &mut Record, kind: RecordKind, sk: u64, netns: u32) {
    rec.ts_ns = unsafe { bpf_ktime_get_ns() };
    rec.sock = sk;
    rec.kind = kind as u8;
    rec.netns = netns;
}

/// Time, socket, kind and namespace (read from the socket) of a record about to be emitted for
/// socket `sk`.
#[inline(always)]
fn stamp(rec: &mut Record, cfg: &Config, kind: RecordKind, sk: u64) {
    stamp_as(rec, kind, sk, netns_of(sk, cfg));
}

/// Fills a close record from the socket's state: owner, duration, final counters, and for the
/// client end of an established connection (`dialled`) the scanner's final figure, so that user
/// space reads no map on a close.
#[inline(always)]
fn closing(rec: &mut Record, st: &SockState, dialled: bool) {
    owner_from_state(rec, st);
    if st.start_ns != 0 && rec.ts_ns >= st.start_ns {
        rec.duration_ns = rec.ts_ns - st.start_ns;
        rec.flags |= Record::FLAG_START_KNOWN;
    }
    rec.flags |= Record::FLAG_COUNTERS;
    rec.bytes_sent = st.bytes_sent;
    rec.bytes_recv = st.bytes_recv;
    rec.msgs_sent = st.msgs_sent;
    rec.msgs_recv = st.msgs_recv;
    if dialled && st.flags & SockState::FLAG_PASSIVE == 0 {
        rec.h2 = st.h2 as u8;
        rec.requests = st.requests;
    }
}

#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn inet_sock_set_state_btf(ctx: BtfTracePointContext) -> i32 {
    // Errors here are failed reads of the socket; there is nothing to report.
    let _ = try_set_state_btf(&ctx);
    0
}

/// The BTF-typed tracepoint (the raw one's arguments, the socket pointer typed): as the raw one,
/// except that a server end's state lives with its socket (`SERVER_ENDS`).
fn try_set_state_btf(ctx: &BtfTracePointContext) -> Result<(), i32> {
    let sk: *mut c_void = ctx.arg(0);
    let cfg = config();
    let Some((kind, mut rec)) = transition(
        &cfg,
        sk as u64,
        ctx.arg::<u64>(1) as i32,
        ctx.arg::<u64>(2) as i32,
    )?
    else {
        return Ok(());
    };
    match kind {
        RecordKind::PassiveOpen => {
            stamp(&mut rec, &cfg, kind, sk as u64);
            // Usually softirq context: the current task is not the owner; its first read or
            // write tells.
            match stored::<SockState>(core::ptr::addr_of!(SERVER_ENDS).cast(), sk, true) {
                Some(st) => {
                    *st = SockState::passive(rec.ts_ns);
                    st.netns = rec.netns;
                }
                None => {
                    count_lost(LostReason::SockMapFull);
                    warn!(
                        ctx,
                        "fanout: no socket storage for a server end; owner and duration will be \
                         missing"
                    );
                }
            }
            emit(&rec, cfg.wakeup_bytes);
            Ok(())
        }
        RecordKind::Close => match server_end(sk) {
            Some(st) => {
                stamp_as(&mut rec, kind, sk as u64, netns_in(st, sk as u64, &cfg));
                closing(&mut rec, st, false);
                // Not left to the socket's release: a closed socket may connect again, and its
                // reads and writes must then count as a client end's.
                // SAFETY: helper call with the map and the typed socket pointer.
                let _ = unsafe {
                    bpf_sk_storage_delete(core::ptr::addr_of!(SERVER_ENDS) as *mut c_void, sk)
                };
                emit(&rec, cfg.wakeup_bytes);
                Ok(())
            }
            None => lifecycle(ctx, &cfg, kind, sk as u64, rec),
        },
        _ => lifecycle(ctx, &cfg, kind, sk as u64, rec),
    }
}

/// Makes the current task the owner of a socket (`st`): the connecting task, or a passively
/// opened socket's first reader or writer (only meaningful in process context).
#[inline(always)]
fn take_owner(st: &mut SockState) {
    let pid_tgid = bpf_get_current_pid_tgid();
    st.tgid = (pid_tgid >> 32) as u32;
    st.tid = pid_tgid as u32;
    st.comm = bpf_get_current_comm().unwrap_or([0; 16]);
    st.flags |= Record::FLAG_OWNER_KNOWN as u32;
}

/// Makes the current task the owner of a passively opened socket (`st`) and tells user space
/// with an `Accepted` record: for state user space cannot read (socket storage), and at accept.
#[inline(always)]
fn claim_owner(cfg: &Config, sk: u64, st: &mut SockState) {
    take_owner(st);
    let mut rec = Record::zeroed();
    owner_from_state(&mut rec, st);
    stamp_as(&mut rec, RecordKind::Accepted, sk, netns_in(st, sk, cfg));
    emit(&rec, cfg.wakeup_bytes);
}

#[tracepoint(category = "syscalls", name = "sys_exit_accept4")]
pub fn sys_exit_accept4(ctx: TracePointContext) -> u32 {
    let _ = try_accept_exit(&ctx);
    0
}

#[tracepoint(category = "syscalls", name = "sys_exit_accept")]
pub fn sys_exit_accept(ctx: TracePointContext) -> u32 {
    let _ = try_accept_exit(&ctx);
    0
}

/// Reads `*(base + off)` as a kernel pointer-sized value.
#[inline(always)]
fn read_u64(base: u64, off: u32) -> Result<u64, i32> {
    // SAFETY: bpf_probe_read_kernel tolerates bad addresses and reports an error instead.
    unsafe { bpf_probe_read_kernel((base + off as u64) as *const u64) }
}

fn try_accept_exit(ctx: &TracePointContext) -> Result<(), i32> {
    let cfg = config();
    let ret: i64 = unsafe { ctx.read_at(cfg.tp.accept_ret as usize)? };
    if ret < 0 {
        return Ok(());
    }
    let fd = ret as u64;
    let off = cfg.offsets;
    // current->files->fdt->fd[fd]->private_data->sk
    let sk = (|| {
        let task = unsafe { bpf_get_current_task() };
        let files = read_u64(task, off.task_files)?;
        let fdt = read_u64(files, off.files_fdt)?;
        let max_fds: u32 =
            unsafe { bpf_probe_read_kernel((fdt + off.fdt_max_fds as u64) as *const u32)? };
        if fd >= max_fds as u64 {
            return Err(-1);
        }
        let fd_array = read_u64(fdt, off.fdt_fd)?;
        let file = read_u64(fd_array + fd * 8, 0)?;
        let socket = read_u64(file, off.file_private_data)?;
        read_u64(socket, off.socket_sk)
    })();
    let sk = match sk {
        Ok(sk) => sk,
        Err(e) => {
            count_lost(LostReason::KernelRead);
            debug!(
                ctx,
                "fanout: accept fd {} not resolved to a socket ({})", fd, e
            );
            return Err(e);
        }
    };
    // Only sockets whose passive open we saw; anything else predates the tracer.
    let Some(st) = SOCKS.get_ptr_mut(sk) else {
        return Ok(());
    };
    // SAFETY: map value pointer from a successful lookup.
    claim_owner(&cfg, sk, unsafe { &mut *st });
    Ok(())
}

const MSG_PEEK: i32 = 2;

#[tracepoint(category = "sock", name = "sock_send_length")]
pub fn sock_send_length(ctx: TracePointContext) -> u32 {
    let _ = try_msg_length(&ctx, true);
    0
}

#[tracepoint(category = "sock", name = "sock_recv_length")]
pub fn sock_recv_length(ctx: TracePointContext) -> u32 {
    let _ = try_msg_length(&ctx, false);
    0
}

#[inline(always)]
fn add(counter: &mut u64, n: u64) {
    // SAFETY: `counter` is a live, aligned map value field; atomic because several CPUs may
    // send or receive on one socket at once.
    unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(counter, n) };
}

/// Counts payload bytes and calls of `sock_sendmsg`/`sock_recvmsg` on tracked TCP sockets.
fn try_msg_length(ctx: &TracePointContext, sent: bool) -> Result<(), i32> {
    let tp = config().tp;
    // SAFETY (read_at): offsets come from the tracepoint's own format file.
    let protocol: u16 = unsafe { ctx.read_at(tp.msg_protocol as usize)? };
    if protocol != IPPROTO_TCP {
        return Ok(());
    }
    let ret: i32 = unsafe { ctx.read_at(tp.msg_ret as usize)? };
    if ret <= 0 {
        return Ok(());
    }
    if !sent {
        let flags: i32 = unsafe { ctx.read_at(tp.msg_flags as usize)? };
        if flags & MSG_PEEK != 0 {
            return Ok(());
        }
    }
    let sk: u64 = unsafe { ctx.read_at(tp.msg_sk as usize)? };
    count_msg(sk, sent, ret);
    Ok(())
}

#[raw_tracepoint(tracepoint = "sock_send_length")]
pub fn sock_send_length_raw(ctx: RawTracePointContext) -> i32 {
    msg_length_raw(&ctx, true);
    0
}

#[raw_tracepoint(tracepoint = "sock_recv_length")]
pub fn sock_recv_length_raw(ctx: RawTracePointContext) -> i32 {
    msg_length_raw(&ctx, false);
    0
}

/// The raw tracepoints (`TP_PROTO(struct sock *sk, int ret, int flags)`): three plain loads and a
/// lookup. No protocol read: only TCP sockets the lifecycle hook saw have an entry.
#[inline(always)]
fn msg_length_raw(ctx: &RawTracePointContext, sent: bool) {
    let ret = ctx.arg::<u64>(1) as i32;
    if ret <= 0 {
        return;
    }
    if !sent && (ctx.arg::<u64>(2) as i32) & MSG_PEEK != 0 {
        return;
    }
    count_msg(ctx.arg(0), sent, ret);
}

#[btf_tracepoint(function = "sock_send_length")]
pub fn sock_send_length_btf(ctx: BtfTracePointContext) -> i32 {
    msg_length_btf(&ctx, true);
    0
}

#[btf_tracepoint(function = "sock_recv_length")]
pub fn sock_recv_length_btf(ctx: BtfTracePointContext) -> i32 {
    msg_length_btf(&ctx, false);
    0
}

/// The BTF-typed length tracepoints: a server end's counters in its socket's storage, and its
/// owner. These hooks run in the context of the task that reads or writes, so a server end's
/// first read or write names its owner, in place of the accept syscall's file-table walk (a
/// syscall tracepoint cannot reach socket storage). A socket accepted and closed without a read
/// or write stays without owner. Client ends count into `SOCKS` as in the raw form.
#[inline(always)]
fn msg_length_btf(ctx: &BtfTracePointContext, sent: bool) {
    let sk: *mut c_void = ctx.arg(0);
    let ret = ctx.arg::<u64>(1) as i32;
    let counted = ret > 0 && (sent || (ctx.arg::<u64>(2) as i32) & MSG_PEEK == 0);
    match server_end(sk) {
        Some(st) => {
            if st.flags & Record::FLAG_OWNER_KNOWN as u32 == 0 {
                claim_owner(&config(), sk as u64, st);
            }
            if counted {
                add_msg(st, sent, ret);
            }
        }
        None if counted => count_msg(sk as u64, sent, ret),
        None => {}
    }
}

/// Adds one call of `ret` bytes to a tracked socket's counters. The raw and classic length
/// hooks run in the context of the task that reads or writes, so a server end's first call that
/// moves data also names its owner: the lookup is the one the counters make anyway, in place of
/// the accept syscall's file-table walk (which the daemon attaches only where the length hooks
/// are missing). The owner stays in the socket's state, where user space reads it (the sampler,
/// once a second, for a row without owner) and the close record carries it: no record of its
/// own, which would cost as much as a lifecycle record.
#[inline(always)]
fn count_msg(sk: u64, sent: bool, ret: i32) {
    let Some(st) = SOCKS.get_ptr_mut(sk) else {
        return;
    };
    // SAFETY: map value pointer from a successful lookup.
    let st = unsafe { &mut *st };
    if st.flags & (SockState::FLAG_PASSIVE | Record::FLAG_OWNER_KNOWN as u32)
        == SockState::FLAG_PASSIVE
    {
        take_owner(st);
    }
    add_msg(st, sent, ret);
}

/// Adds one call of `ret` bytes to a socket state's counters.
#[inline(always)]
fn add_msg(st: &mut SockState, sent: bool, ret: i32) {
    if sent {
        add(&mut st.bytes_sent, ret as u64);
        add(&mut st.msgs_sent, 1);
    } else {
        add(&mut st.bytes_recv, ret as u64);
        add(&mut st.msgs_recv, 1);
    }
}

const IPPROTO_TCP_U8: u8 = 6;

/// Counts client-initiated HTTP/2 streams (gRPC requests) in the TCP payload leaving every
/// socket of the cgroup hierarchy. Always lets the packet through.
#[cgroup_skb]
pub fn h2_egress(ctx: SkBuffContext) -> i32 {
    let _ = try_h2_egress(&ctx);
    1
}

/// Bytes of the fixed IPv4 header and of the TCP header: one window of each holds every field the
/// scanner reads (IPv6's next-header field is in its first 20 bytes too).
const HEADER_WINDOW: usize = 20;

/// The `HEADER_WINDOW` bytes at `off` of the packet (the network header is at 0): by direct packet
/// access when they are in the linear part, as the TCP/IP headers this host builds always are,
/// else through the `bpf_skb_load_bytes` helper. The window is never shorter than a header: a
/// one-byte bounds check would reach the verifier as `data < data_end`, from which it grants no
/// range.
#[inline(always)]
fn header_at(
    ctx: &SkBuffContext,
    data: usize,
    end: usize,
    off: u32,
) -> Result<[u8; HEADER_WINDOW], i64> {
    let at = data + off as usize;
    if at + HEADER_WINDOW <= end {
        // SAFETY: the bytes lie between the packet's data and data_end, checked just above in
        // the form the verifier tracks.
        Ok(unsafe { core::ptr::read_unaligned(at as *const [u8; HEADER_WINDOW]) })
    } else {
        ctx.load(off as usize)
    }
}

/// A payload segment leaving a full socket.
struct Egress {
    sk: *mut bpf_sock,
    /// TCP sequence number of its first payload byte.
    seq: u32,
    /// Offset of the payload in the packet.
    off: u32,
    /// Payload bytes.
    len: u32,
}

/// The packet's TCP payload and its full socket, or None for what carries nothing to scan.
#[inline(always)]
fn egress_payload(ctx: &SkBuffContext) -> Result<Option<Egress>, i64> {
    let skb = ctx.skb.skb;
    // SAFETY: context fields the verifier turns into packet pointers (readable with CAP_BPF).
    let (data, end) = unsafe { ((*skb).data as usize, (*skb).data_end as usize) };
    // Cheapest test first: most packets (SYN, ACK, FIN, RST) carry no payload, and those cost
    // two header reads and nothing else: no socket fields, no map lookup, no helper call.
    let ip = header_at(ctx, data, end, 0)?;
    let l4 = match ip[0] >> 4 {
        4 if ip[9] == IPPROTO_TCP_U8 => ((ip[0] & 0xf) as u32) * 4,
        // Extension headers are not followed: TCP must be the next header.
        6 if ip[6] == IPPROTO_TCP_U8 => 40,
        _ => return Ok(None),
    };
    let tcp = header_at(ctx, data, end, l4)?;
    let off = l4 + ((tcp[12] >> 4) as u32) * 4;
    let len = ctx.len();
    if len <= off {
        return Ok(None);
    }
    // SAFETY: reading the context's socket pointer; the verifier checks the access.
    let sk = unsafe { (*skb).__bindgen_anon_2.sk };
    if sk.is_null() {
        return Ok(None);
    }
    // SAFETY: helper call on the context's socket; NULL for request and timewait sockets, which
    // send no payload.
    let sk = unsafe { bpf_sk_fullsock(sk) };
    if sk.is_null() {
        return Ok(None);
    }
    Ok(Some(Egress {
        sk,
        seq: u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]),
        off,
        len: len - off,
    }))
}

/// The scanner state of the segment's socket, and whether this run made it: the existing one, or
/// a new one when the segment
/// opens HTTP/2 (the preface, or a TLS ClientHello, which the scanner marks `tls` at once so
/// that the figure says why it fell back to messages) on a client socket the lifecycle hook
/// tracks. None for every other socket: one storage lookup and a 6-byte read per payload packet,
/// never an entry.
#[inline(always)]
fn scanner_of(
    ctx: &SkBuffContext,
    seg: &Egress,
) -> Result<Option<(&'static mut H2Scan, bool)>, i64> {
    let map: *const c_void = core::ptr::addr_of!(SLOTS).cast();
    if let Some(scan) = stored::<H2Scan>(map, seg.sk.cast(), false) {
        return Ok(Some((scan, false)));
    }
    if seg.len < 6 {
        return Ok(None);
    }
    let head: [u8; 6] = ctx.load(seg.off as usize)?;
    let preface = head[..4] == *b"PRI ";
    // Record type handshake (22), then version (2), length (2), handshake type 1.
    let client_hello = head[0] == 0x16 && head[1] == 0x03 && head[5] == 0x01;
    if !preface && !client_hello {
        return Ok(None);
    }
    match SOCKS.get_ptr(seg.sk as u64) {
        // SAFETY: map value pointer from a successful lookup.
        Some(st) if unsafe { (*st).flags } & SockState::FLAG_PASSIVE == 0 => {}
        _ => return Ok(None),
    }
    // A new value is zeroed, which is `H2Scan::new()`.
    match stored::<H2Scan>(map, seg.sk.cast(), true) {
        Some(scan) => Ok(Some((scan, true))),
        None => {
            count_lost(LostReason::SockMapFull);
            Ok(None)
        }
    }
}

fn try_h2_egress(ctx: &SkBuffContext) -> Result<(), i64> {
    let Some(seg) = egress_payload(ctx)? else {
        return Ok(());
    };
    let Some((st, made)) = scanner_of(ctx, &seg)? else {
        return Ok(());
    };
    let before = (st.status(), st.requests());
    if st.parsable() {
        let skb = ctx.skb.skb;
        st.scan_segment(seg.seq, seg.len, |start, window| {
            // SAFETY: the helper writes exactly window.len() bytes into `window`.
            unsafe {
                bpf_skb_load_bytes(
                    skb.cast(),
                    (seg.off as i64 + start) as u32,
                    window.as_mut_ptr().cast(),
                    window.len() as u32,
                ) == 0
            }
        });
    }
    // The figure in the socket's `SOCKS` entry, where the sampler and the close read it, is
    // updated when it changes: at the first payload, and at each packet that opens a stream.
    let after = (st.status(), st.requests());
    if (made || after != before)
        && let Some(s) = SOCKS.get_ptr_mut(seg.sk as u64)
    {
        // SAFETY: map value pointer from a successful lookup.
        let s = unsafe { &mut *s };
        s.h2 = after.0 as u32;
        s.requests = after.1;
    }
    Ok(())
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
