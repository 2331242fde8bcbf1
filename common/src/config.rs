//! Load-time configuration handed to the eBPF programs as a read-only global.
//!
//! Rust eBPF programs get no CO-RE relocations, so every kernel layout the programs depend on is
//! resolved by the daemon at load time (tracepoint formats from tracefs, struct member offsets from
//! `/sys/kernel/btf/vmlinux`) and written here before the programs are loaded.

/// Byte offsets of the fields fanout reads from tracepoint records, as the tracepoints' `format`
/// files give them.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct TracepointLayout {
    /// `sock/inet_sock_set_state`
    pub skaddr: u16,
    pub oldstate: u16,
    pub newstate: u16,
    pub sport: u16,
    pub dport: u16,
    pub family: u16,
    pub protocol: u16,
    pub saddr: u16,
    pub daddr: u16,
    pub saddr_v6: u16,
    pub daddr_v6: u16,
    /// `syscalls/sys_exit_accept{,4}`: the returned file descriptor.
    pub accept_ret: u16,
    /// `sock/sock_send_length` and `sock/sock_recv_length` (one event class, one layout).
    pub msg_sk: u16,
    pub msg_protocol: u16,
    pub msg_ret: u16,
    pub msg_flags: u16,
}

/// Byte offsets of kernel struct members, resolved from BTF.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct KernelOffsets {
    /// `struct sock` → `__sk_common.skc_net.net` (`struct net *`).
    pub sock_net: u32,
    /// `struct net` → `ns.inum`.
    pub net_inum: u32,
    /// `struct task_struct` → `files`.
    pub task_files: u32,
    /// `struct files_struct` → `fdt`.
    pub files_fdt: u32,
    /// `struct fdtable` → `max_fds`.
    pub fdt_max_fds: u32,
    /// `struct fdtable` → `fd`.
    pub fdt_fd: u32,
    /// `struct file` → `private_data` (the `struct socket *` of a socket file).
    pub file_private_data: u32,
    /// `struct socket` → `sk`.
    pub socket_sk: u32,
}

/// Byte offsets in `struct sock` (`struct inet_sock`, which starts with it) of what the raw tracepoints read from the socket (the classic
/// tracepoints carry these in their record). From BTF; a member that is a bitfield on some kernel
/// leaves the raw tracepoints unused there.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct SockLayout {
    /// `sk_protocol` (u16).
    pub protocol: u16,
    /// `__sk_common.skc_family` (u16).
    pub family: u16,
    /// `inet_sock.inet_sport`: the local port, network order (u16). Not `skc_num`, which the
    /// kernel clears when it releases the port, before the close transition.
    pub sport: u16,
    /// `__sk_common.skc_dport`: the remote port, network order (u16).
    pub dport: u16,
    /// `inet_sock.inet_saddr` (4 bytes, network order), as the classic tracepoint reads it.
    pub saddr: u16,
    /// `__sk_common.skc_daddr` (4 bytes, network order).
    pub daddr: u16,
    /// `__sk_common.skc_v6_rcv_saddr` (16 bytes).
    pub v6_rcv_saddr: u16,
    /// `__sk_common.skc_v6_daddr` (16 bytes).
    pub v6_daddr: u16,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct Config {
    pub tp: TracepointLayout,
    pub offsets: KernelOffsets,
    /// Used by the raw tracepoints only.
    pub sk: SockLayout,
    /// Wake the reader once this many bytes are waiting in the ring buffer; below it records are
    /// submitted without a wakeup and the reader polls on a timer.
    pub wakeup_bytes: u64,
}

impl Config {
    pub const fn zeroed() -> Self {
        Config {
            tp: TracepointLayout {
                skaddr: 0,
                oldstate: 0,
                newstate: 0,
                sport: 0,
                dport: 0,
                family: 0,
                protocol: 0,
                saddr: 0,
                daddr: 0,
                saddr_v6: 0,
                daddr_v6: 0,
                accept_ret: 0,
                msg_sk: 0,
                msg_protocol: 0,
                msg_ret: 0,
                msg_flags: 0,
            },
            offsets: KernelOffsets {
                sock_net: 0,
                net_inum: 0,
                task_files: 0,
                files_fdt: 0,
                fdt_max_fds: 0,
                fdt_fd: 0,
                file_private_data: 0,
                socket_sk: 0,
            },
            sk: SockLayout {
                protocol: 0,
                family: 0,
                sport: 0,
                dport: 0,
                saddr: 0,
                daddr: 0,
                v6_rcv_saddr: 0,
                v6_daddr: 0,
            },
            wakeup_bytes: 0,
        }
    }
}

#[cfg(feature = "user")]
// SAFETY: plain `#[repr(C)]` data without padding; any bit pattern is valid.
unsafe impl aya::Pod for Config {}

#[cfg(test)]
mod tests {
    #[test]
    fn config_has_no_padding() {
        assert_eq!(core::mem::size_of::<super::TracepointLayout>(), 32);
        assert_eq!(core::mem::size_of::<super::KernelOffsets>(), 32);
        assert_eq!(core::mem::size_of::<super::SockLayout>(), 16);
        assert_eq!(core::mem::size_of::<super::Config>(), 88);
    }
}
