//! `loadgen`: the load loop of `cargo xtask bench`, a compiled program built in release so that
//! the benchmark measures the tracer and not an interpreter or a debug build.
//!
//! Both modes enter a network namespace first (`--netns /run/netns/NAME`) and pin every worker
//! thread to the CPUs they are given (sched_setaffinity), so that the load never shares a CPU it
//! was not given.
//!
//! * `loadgen serve --netns PATH --cpus 1 --threads 4 --addr 127.0.0.1:0` listens, prints
//!   `port N`, and answers every connection: read 64 B, write 64 B, read until EOF, close. It
//!   stops when its stdin closes.
//! * `loadgen hold --netns PATH --addr ADDR` listens, prints `port N`, accepts connections and
//!   keeps them open; every line on stdin is answered with `held N`. It stops (closing them all)
//!   when its stdin closes. A process of its own, so that the held connections' two ends do not
//!   share one open-files limit.
//! * `loadgen client --netns PATH` reads one command per line on stdin and answers one line:
//!   `conn|refused THREADS COUNT SECS RATE CPUS ADDR` → `done OK ERRORS SECS CPU_SECS`.
//!   `conn` is connect, 64 B request, 64 B reply, close; `refused` is a connect to a port nobody
//!   listens on (a SYN answered by a RST). It stops after COUNT attempts (0: no limit) or SECS
//!   seconds, whichever comes first; RATE is the total attempts per second (0: as fast as it
//!   can), CPUS a comma-separated list the threads are pinned to in turn. CPU_SECS is the CPU
//!   time of the load threads over the run (CLOCK_THREAD_CPUTIME_ID): unlike SECS, it does not
//!   grow when other processes take the CPU. It exits when its stdin closes.

use std::{
    io::{BufRead as _, Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd as _,
    sync::{
        Arc, Barrier,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

const MSG: usize = 64;

fn usage() -> ! {
    eprintln!(
        "usage: loadgen serve --netns PATH --cpus LIST --threads N --addr ADDR\n       \
         loadgen client --netns PATH   (commands on stdin)\n       \
         loadgen hold --netns PATH --addr ADDR"
    );
    std::process::exit(2)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(mode) = args.first() else { usage() };
    let flag = |name: &str| -> Option<&str> {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .map(String::as_str)
    };
    if let Some(netns) = flag("--netns")
        && let Err(e) = enter(netns)
    {
        eprintln!("loadgen: entering {netns}: {e}");
        std::process::exit(1);
    }
    let result = match mode.as_str() {
        "serve" => serve(
            &parse_cpus(flag("--cpus").unwrap_or("")).unwrap_or_else(|| usage()),
            flag("--threads").and_then(|t| t.parse().ok()).unwrap_or(1),
            flag("--addr")
                .and_then(|a| a.parse().ok())
                .unwrap_or_else(|| usage()),
        ),
        "client" => client(),
        "hold" => hold(
            flag("--addr")
                .and_then(|a| a.parse().ok())
                .unwrap_or_else(|| usage()),
        ),
        _ => usage(),
    };
    if let Err(e) = result {
        eprintln!("loadgen: {e}");
        std::process::exit(1);
    }
}

/// Moves the calling thread (and the threads it creates afterwards) into a network namespace.
fn enter(path: &str) -> std::io::Result<()> {
    let f = std::fs::File::open(path)?;
    // SAFETY: a valid namespace fd; only this thread changes namespace.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Pins the calling thread to `cpus`.
fn pin(cpus: &[usize]) -> std::io::Result<()> {
    // SAFETY: cpu_set_t is plain data; CPU_SET stays within it for cpu < CPU_SETSIZE.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for &c in cpus {
            libc::CPU_SET(c, &mut set);
        }
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// "0,1" → [0, 1].
fn parse_cpus(s: &str) -> Option<Vec<usize>> {
    let v: Option<Vec<usize>> = s
        .split(',')
        .map(|c| c.trim().parse().ok().filter(|&c| c < 1024))
        .collect();
    v.filter(|v| !v.is_empty())
}

fn serve(cpus: &[usize], threads: usize, addr: SocketAddr) -> std::io::Result<()> {
    let listener = TcpListener::bind(addr)?;
    let port = listener.local_addr()?.port();
    let listener = Arc::new(listener);
    for _ in 0..threads.max(1) {
        let (l, cpus) = (listener.clone(), cpus.to_vec());
        std::thread::spawn(move || {
            if let Err(e) = pin(&cpus) {
                eprintln!("loadgen serve: pinning: {e}");
                std::process::exit(1);
            }
            let mut buf = [0u8; MSG];
            loop {
                let Ok((mut s, _)) = l.accept() else { continue };
                let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                if s.read_exact(&mut buf).is_ok() && s.write_all(&buf).is_ok() {
                    // Until the client's FIN; then close.
                    let _ = s.read(&mut buf);
                }
            }
        });
    }
    println!("port {port}");
    std::io::stdout().flush()?;
    // Serve until our parent closes stdin (or dies).
    let mut sink = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut sink);
    Ok(())
}

fn hold(addr: SocketAddr) -> std::io::Result<()> {
    // As many open files as the hard limit allows.
    // SAFETY: getrlimit/setrlimit on a valid struct.
    unsafe {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
    let listener = TcpListener::bind(addr)?;
    println!("port {}", listener.local_addr()?.port());
    std::io::stdout().flush()?;
    let held = Arc::new(AtomicU64::new(0));
    let h = held.clone();
    std::thread::spawn(move || {
        let mut conns = Vec::new();
        loop {
            match listener.accept() {
                Ok((s, _)) => {
                    conns.push(s);
                    h.store(conns.len() as u64, Ordering::Relaxed);
                }
                // Out of files, say: do not spin.
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    });
    let mut out = std::io::stdout();
    for line in std::io::stdin().lock().lines() {
        line?;
        writeln!(out, "held {}", held.load(Ordering::Relaxed))?;
        out.flush()?;
    }
    Ok(())
}

/// One command of the client.
#[derive(Debug, PartialEq)]
struct Cmd {
    refused: bool,
    threads: usize,
    count: u64,
    secs: f64,
    rate: f64,
    cpus: Vec<usize>,
    addr: SocketAddr,
}

fn parse_cmd(line: &str) -> Option<Cmd> {
    let f: Vec<&str> = line.split_whitespace().collect();
    let [mode, threads, count, secs, rate, cpus, addr] = f.as_slice() else {
        return None;
    };
    Some(Cmd {
        refused: match *mode {
            "conn" => false,
            "refused" => true,
            _ => return None,
        },
        threads: threads.parse().ok().filter(|&t| t > 0)?,
        count: count.parse().ok()?,
        secs: secs.parse().ok().filter(|&s: &f64| s > 0.0)?,
        rate: rate.parse().ok().filter(|&r: &f64| r >= 0.0)?,
        cpus: parse_cpus(cpus)?,
        addr: addr.parse().ok()?,
    })
}

fn client() -> std::io::Result<()> {
    let stdin = std::io::stdin();
    let mut out = std::io::stdout();
    for line in stdin.lock().lines() {
        let line = line?;
        let Some(cmd) = parse_cmd(&line) else {
            writeln!(out, "error bad command {line:?}")?;
            out.flush()?;
            continue;
        };
        let (ok, errors, secs, cpu) = run(&cmd)?;
        writeln!(out, "done {ok} {errors} {secs:.6} {cpu:.6}")?;
        out.flush()?;
    }
    Ok(())
}

/// CPU time of the calling thread, in nanoseconds.
fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec for the call to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Runs one command; returns (successes, errors, seconds from the start of the first thread to
/// the end of the last, CPU seconds of the threads over the same time).
fn run(cmd: &Cmd) -> std::io::Result<(u64, u64, f64, f64)> {
    let started = Arc::new(AtomicU64::new(0));
    let cpu_ns = Arc::new(AtomicU64::new(0));
    let ok = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    // Every thread is pinned and ready before the clock starts.
    let barrier = Arc::new(Barrier::new(cmd.threads + 1));
    let interval = if cmd.rate > 0.0 {
        Some(Duration::from_secs_f64(cmd.threads as f64 / cmd.rate))
    } else {
        None
    };
    let window = Duration::from_secs_f64(cmd.secs);
    let mut handles = Vec::new();
    for i in 0..cmd.threads {
        let cpu = cmd.cpus[i % cmd.cpus.len()];
        let (started, ok, errors, barrier, cpu_ns) = (
            started.clone(),
            ok.clone(),
            errors.clone(),
            barrier.clone(),
            cpu_ns.clone(),
        );
        let (count, refused, addr) = (cmd.count, cmd.refused, cmd.addr);
        handles.push(std::thread::spawn(move || -> std::io::Result<()> {
            let pinned = pin(&[cpu]);
            barrier.wait();
            pinned?;
            let cpu0 = thread_cpu_ns();
            let start = Instant::now();
            let end = start + window;
            let mut next = start;
            let (mut buf, req) = ([0u8; MSG], [b'x'; MSG]);
            loop {
                let now = Instant::now();
                if now >= end {
                    break;
                }
                if count > 0 && started.fetch_add(1, Ordering::Relaxed) >= count {
                    break;
                }
                if let Some(iv) = interval {
                    if next > now {
                        std::thread::sleep(next - now);
                    } else if now - next > Duration::from_millis(10) {
                        // Behind: do not make up for more than 10 ms.
                        next = now;
                    }
                    next += iv;
                }
                let done = if refused {
                    // Success is the refusal itself.
                    matches!(TcpStream::connect(addr),
                        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused)
                } else {
                    TcpStream::connect(addr).is_ok_and(|mut s| {
                        s.write_all(&req).is_ok() && s.read_exact(&mut buf).is_ok()
                    })
                };
                if done {
                    ok.fetch_add(1, Ordering::Relaxed);
                } else {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
            }
            cpu_ns.fetch_add(thread_cpu_ns() - cpu0, Ordering::Relaxed);
            Ok(())
        }));
    }
    barrier.wait();
    let start = Instant::now();
    for h in handles {
        h.join()
            .map_err(|_| std::io::Error::other("a load thread panicked"))??;
    }
    let secs = start.elapsed().as_secs_f64();
    Ok((
        ok.load(Ordering::Relaxed),
        errors.load(Ordering::Relaxed),
        secs,
        cpu_ns.load(Ordering::Relaxed) as f64 / 1e9,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_parse() {
        let c = parse_cmd("conn 2 20000 3.5 0 0,1 127.0.0.1:8080").unwrap();
        assert_eq!(
            c,
            Cmd {
                refused: false,
                threads: 2,
                count: 20000,
                secs: 3.5,
                rate: 0.0,
                cpus: vec![0, 1],
                addr: "127.0.0.1:8080".parse().unwrap(),
            }
        );
        assert!(
            parse_cmd("refused 1 0 3 5000 0 127.0.0.1:9")
                .unwrap()
                .refused
        );
        assert_eq!(parse_cmd("conn 0 1 1 0 0 127.0.0.1:1"), None, "no threads");
        assert_eq!(parse_cmd("conn 1 1 0 0 0 127.0.0.1:1"), None, "no time");
        assert_eq!(parse_cmd("conn 1 1 1 0 x 127.0.0.1:1"), None, "bad cpus");
        assert_eq!(parse_cmd("ping 1 1 1 0 0 127.0.0.1:1"), None);
        assert_eq!(parse_cmd("conn 1 1 1 0 0"), None);
        assert_eq!(parse_cpus("1"), Some(vec![1]));
        assert_eq!(parse_cpus(""), None);
    }
}
