//! TCP socket states as the kernel numbers them (include/net/tcp_states.h) and the mapping from a
//! state transition to the lifecycle step fanout reports.

use crate::record::RecordKind;

pub const TCP_ESTABLISHED: i32 = 1;
pub const TCP_SYN_SENT: i32 = 2;
pub const TCP_SYN_RECV: i32 = 3;
pub const TCP_FIN_WAIT1: i32 = 4;
pub const TCP_FIN_WAIT2: i32 = 5;
pub const TCP_TIME_WAIT: i32 = 6;
pub const TCP_CLOSE: i32 = 7;
pub const TCP_CLOSE_WAIT: i32 = 8;
pub const TCP_LAST_ACK: i32 = 9;
pub const TCP_LISTEN: i32 = 10;
pub const TCP_CLOSING: i32 = 11;
pub const TCP_NEW_SYN_RECV: i32 = 12;

pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;
pub const IPPROTO_TCP: u16 = 6;

/// The lifecycle step a `sock/inet_sock_set_state` transition stands for, if any.
///
/// * `CLOSE -> SYN_SENT`: `connect()` (runs in the connecting task's context).
/// * `SYN_SENT -> ESTABLISHED`: the active open completed.
/// * `SYN_RECV -> ESTABLISHED`: a passive open completed (usually softirq context; the owner is
///   learnt later, when `accept()` returns the socket).
/// * `SYN_SENT -> CLOSE`: the connect failed (refused, timed out, reset).
/// * `<any synchronized state> -> CLOSE`: an established connection ended.
///
/// Listening sockets and half-open children that never established are not connections.
#[inline(always)]
pub fn classify(oldstate: i32, newstate: i32) -> Option<RecordKind> {
    match (oldstate, newstate) {
        (TCP_CLOSE, TCP_SYN_SENT) => Some(RecordKind::Connect),
        (TCP_SYN_SENT, TCP_ESTABLISHED) => Some(RecordKind::Established),
        (TCP_SYN_RECV, TCP_ESTABLISHED) => Some(RecordKind::PassiveOpen),
        (TCP_SYN_SENT, TCP_CLOSE) => Some(RecordKind::ConnectFailed),
        (
            TCP_ESTABLISHED | TCP_FIN_WAIT1 | TCP_FIN_WAIT2 | TCP_TIME_WAIT | TCP_CLOSE_WAIT
            | TCP_LAST_ACK | TCP_CLOSING,
            TCP_CLOSE,
        ) => Some(RecordKind::Close),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn active_open_lifecycle() {
        assert_eq!(classify(TCP_CLOSE, TCP_SYN_SENT), Some(RecordKind::Connect));
        assert_eq!(
            classify(TCP_SYN_SENT, TCP_ESTABLISHED),
            Some(RecordKind::Established)
        );
        assert_eq!(classify(TCP_ESTABLISHED, TCP_FIN_WAIT1), None);
        assert_eq!(classify(TCP_FIN_WAIT2, TCP_CLOSE), Some(RecordKind::Close));
    }

    #[test]
    fn passive_open_and_failures() {
        assert_eq!(
            classify(TCP_SYN_RECV, TCP_ESTABLISHED),
            Some(RecordKind::PassiveOpen)
        );
        assert_eq!(
            classify(TCP_SYN_SENT, TCP_CLOSE),
            Some(RecordKind::ConnectFailed)
        );
        assert_eq!(classify(TCP_LAST_ACK, TCP_CLOSE), Some(RecordKind::Close));
        assert_eq!(
            classify(TCP_ESTABLISHED, TCP_CLOSE),
            Some(RecordKind::Close)
        );
    }

    #[test]
    fn listeners_and_embryos_are_not_connections() {
        assert_eq!(classify(TCP_CLOSE, TCP_LISTEN), None);
        assert_eq!(classify(TCP_LISTEN, TCP_CLOSE), None);
        assert_eq!(classify(TCP_LISTEN, TCP_SYN_RECV), None);
        assert_eq!(classify(TCP_SYN_RECV, TCP_CLOSE), None);
        assert_eq!(classify(TCP_NEW_SYN_RECV, TCP_ESTABLISHED), None);
        assert_eq!(classify(TCP_CLOSE, TCP_CLOSE), None);
    }
}
