//! Network namespaces for tests that need real separate hosts on one machine: a device and a
//! pilot that share no network path except through the relay, which runs in the test's own
//! (root) namespace.
//!
//! Every name (namespaces, root-side interfaces) and every subnet is unique per topology (the
//! process id and a counter, and a `10.<x>.0.0/16` no route of the machine already covers), so
//! tests in one binary, or two binaries, can build theirs at once. [`Topology`]'s `Drop` deletes
//! it all, on a panic too.
//!
//! Building one needs root (or CAP_NET_ADMIN and CAP_SYS_ADMIN) and iproute2's `ip`;
//! [`require_root_and_ip`] fails the test with a clear message where they are missing: a test of
//! the namespaces must not pass by skipping them.
#![allow(dead_code)]

use std::net::Ipv4Addr;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

/// Fails (panics) unless the test can build namespaces: root, and `ip` with netns support.
pub fn require_root_and_ip() {
    let uid = nix::unistd::geteuid();
    assert!(
        uid.is_root(),
        "this test builds network namespaces and veth pairs and must run as root (euid is {uid}); \
         CI runs it as root. Run it with sudo, or in a container as root with NET_ADMIN and SYS_ADMIN."
    );
    match Command::new("ip").args(["netns", "list"]).output() {
        Ok(out) if out.status.success() => {}
        Ok(out) => panic!(
            "`ip netns list` failed ({}): {}; this test needs iproute2 with network namespace support",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ),
        Err(e) => panic!("cannot run `ip` ({e}); this test needs iproute2 (apt-get install iproute2)"),
    }
}

/// Runs `ip` with `args`; panics with its output when it fails.
pub fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().unwrap_or_else(|e| panic!("cannot run ip {args:?}: {e}"));
    assert!(
        out.status.success(),
        "ip {} failed ({}): {}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
}

/// Runs `ip` with `args`, ignoring failure (cleanup).
fn ip_quiet(args: &[&str]) {
    let _ = Command::new("ip").args(args).output();
}

/// Topologies built by this process so far (names and subnets of each are distinct).
static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A second octet `x` whose `10.x.0.0/16` is free: no address or route of the root namespace
/// lies in it. Derived from the process id and `n` so that concurrent processes start apart.
fn free_second_octet(n: u32) -> u8 {
    let routes = Command::new("ip").args(["-4", "route", "show", "table", "all"]).output().unwrap();
    let addrs = Command::new("ip").args(["-4", "-o", "addr", "show"]).output().unwrap();
    let taken = format!("{}\n{}", String::from_utf8_lossy(&routes.stdout), String::from_utf8_lossy(&addrs.stdout));
    let start = (std::process::id().wrapping_mul(7).wrapping_add(n.wrapping_mul(13))) % 200;
    for i in 0..200 {
        let x = 30 + (start + i) % 200;
        // `10.x.` preceded by a non-digit (so 110.x. does not count).
        let needle = format!("10.{x}.");
        let used = taken.match_indices(&needle).any(|(at, _)| at == 0 || !taken.as_bytes()[at - 1].is_ascii_digit());
        if !used {
            return x as u8;
        }
    }
    panic!("no free 10.x.0.0/16 for the test's namespaces; routes and addresses:\n{taken}");
}

/// Two namespaces, `boat` (the device) and `pilot`, each joined to the root namespace by a veth
/// pair on a /24 of its own:
///
/// ```text
///   root  10.x.1.1/24 --veth-- 10.x.1.2/24  boat
///   root  10.x.2.1/24 --veth-- 10.x.2.2/24  pilot
///  [boat  10.x.3.1/24 --veth-- 10.x.3.2/24  pilot]   with `direct` only
/// ```
///
/// No namespace has a default route, and the root namespace does not forward between the two
/// subnets, so without `direct` nothing the boat sends reaches the pilot's address or back:
/// only the relay's addresses (10.x.1.1 and 10.x.2.1) are reachable from both. With `direct`
/// the boat and the pilot share a link, and host candidates on it pair directly.
#[derive(Debug)]
pub struct Topology {
    /// The boat's namespace.
    pub boat: String,
    /// The pilot's namespace.
    pub pilot: String,
    /// The relay's address as the boat reaches it (root side of the boat's link).
    pub relay_for_boat: Ipv4Addr,
    /// The relay's address as the pilot reaches it.
    pub relay_for_pilot: Ipv4Addr,
    /// The boat's address on its link to the root namespace.
    pub boat_addr: Ipv4Addr,
    /// The pilot's address on its link to the root namespace.
    pub pilot_addr: Ipv4Addr,
    /// The boat's and the pilot's addresses on their direct link, when there is one.
    pub direct: Option<(Ipv4Addr, Ipv4Addr)>,
    /// Root-side interfaces (deleting one deletes its pair).
    links: Vec<String>,
}

impl Topology {
    /// Builds it (see the type's doc); `direct` adds the boat <-> pilot link.
    pub fn build(direct: bool) -> Topology {
        require_root_and_ip();
        reap_stale();
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let x = free_second_octet(n);
        let mut t = Topology {
            boat: format!("tether-{pid}-{n}-boat"),
            pilot: format!("tether-{pid}-{n}-pilot"),
            relay_for_boat: Ipv4Addr::new(10, x, 1, 1),
            relay_for_pilot: Ipv4Addr::new(10, x, 2, 1),
            boat_addr: Ipv4Addr::new(10, x, 1, 2),
            pilot_addr: Ipv4Addr::new(10, x, 2, 2),
            direct: None,
            links: Vec::new(),
        };
        // Interface names are at most 15 bytes: "tb" + pid (<= 7 digits) + "x" + n.
        let boat_link = format!("tb{pid}x{n}");
        let pilot_link = format!("tp{pid}x{n}");
        ip(&["netns", "add", &t.boat]);
        // From here on, Drop cleans up whatever was built if a later step panics.
        ip(&["netns", "add", &t.pilot]);
        for ns in [&t.boat, &t.pilot] {
            ip(&["-n", ns, "link", "set", "lo", "up"]);
            // IPv4 only: link-local IPv6 addresses would add candidates that go nowhere.
            for key in ["net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1"] {
                let _ = Command::new("ip").args(["netns", "exec", ns, "sysctl", "-qw", key]).output();
            }
        }
        for (link, ns, root_addr, ns_addr) in [
            (&boat_link, &t.boat, t.relay_for_boat, t.boat_addr),
            (&pilot_link, &t.pilot, t.relay_for_pilot, t.pilot_addr),
        ] {
            ip(&["link", "add", link, "type", "veth", "peer", "name", "up0", "netns", ns]);
            t.links.push(link.clone());
            ip(&["addr", "add", &format!("{root_addr}/24"), "dev", link]);
            ip(&["link", "set", link, "up"]);
            ip(&["-n", ns, "addr", "add", &format!("{ns_addr}/24"), "dev", "up0"]);
            ip(&["-n", ns, "link", "set", "up0", "up"]);
        }
        if direct {
            let (b, p) = (Ipv4Addr::new(10, x, 3, 1), Ipv4Addr::new(10, x, 3, 2));
            ip(&[
                "-n", &t.boat, "link", "add", "direct0", "type", "veth", "peer", "name", "direct0", "netns", &t.pilot,
            ]);
            ip(&["-n", &t.boat, "addr", "add", &format!("{b}/24"), "dev", "direct0"]);
            ip(&["-n", &t.pilot, "addr", "add", &format!("{p}/24"), "dev", "direct0"]);
            ip(&["-n", &t.boat, "link", "set", "direct0", "up"]);
            ip(&["-n", &t.pilot, "link", "set", "direct0", "up"]);
            t.direct = Some((b, p));
        }
        // The premise of the blocked case, checked: the boat has no route to the pilot (and
        // with the direct link, it has one).
        let reaches = |ns: &str, to: Ipv4Addr| {
            Command::new("ip").args(["-n", ns, "route", "get", &to.to_string()]).output().unwrap().status.success()
        };
        assert!(!reaches(&t.boat, t.pilot_addr) && !reaches(&t.pilot, t.boat_addr), "boat and pilot reach each other");
        if let Some((b, p)) = t.direct {
            assert!(reaches(&t.boat, p) && reaches(&t.pilot, b), "the direct link does not route");
        }
        eprintln!(
            "topology: relay {} (boat side) / {} (pilot side); boat {} in {}; pilot {} in {}; direct link {:?}",
            t.relay_for_boat, t.relay_for_pilot, t.boat_addr, t.boat, t.pilot_addr, t.pilot, t.direct
        );
        t
    }

    /// `ip netns exec <ns> <program>`: `program` runs in `ns` (iproute2 execs it in place, so
    /// the child's pid is the program's own and killing the child kills it).
    pub fn exec_in(ns: &str, program: impl AsRef<std::ffi::OsStr>) -> tokio::process::Command {
        let mut c = tokio::process::Command::new("ip");
        c.args(["netns", "exec", ns]).arg(program);
        c
    }

    /// A summary of a namespace's addresses and routes, for failure messages.
    pub fn describe(ns: &str) -> String {
        let out = Command::new("ip").args(["-n", ns, "-4", "-o", "addr"]).output();
        let routes = Command::new("ip").args(["-n", ns, "-4", "route"]).output();
        let text = |o: std::io::Result<std::process::Output>| {
            o.map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_else(|e| e.to_string())
        };
        format!("{ns}:\n{}{}", text(out), text(routes))
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for link in &self.links {
            ip_quiet(&["link", "del", link]);
        }
        // Deleting a namespace deletes the interfaces in it (and their veth peers).
        ip_quiet(&["netns", "del", &self.boat]);
        ip_quiet(&["netns", "del", &self.pilot]);
    }
}

/// Removes what test processes that are gone (killed before their `Drop` ran) left behind:
/// their namespaces (which takes the veth pairs with them) and any process still inside one
/// (an agent whose test was killed).
fn reap_stale() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else { return };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some(name) = line.split_whitespace().next() else { continue };
        let Some(pid) = name.strip_prefix("tether-").and_then(|r| r.split('-').next()) else { continue };
        let Ok(pid) = pid.parse::<u32>() else { continue };
        if pid == std::process::id() || std::path::Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        if let Ok(pids) = Command::new("ip").args(["netns", "pids", name]).output() {
            for p in String::from_utf8_lossy(&pids.stdout).split_whitespace().filter_map(|p| p.parse::<i32>().ok()) {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(p), nix::sys::signal::Signal::SIGKILL);
            }
        }
        eprintln!("removing network namespace {name}, left behind by test process {pid}");
        ip_quiet(&["netns", "del", name]);
    }
}

/// Moves the calling thread into network namespace `ns` (one made with `ip netns add`). Only
/// this thread moves; threads it spawns afterwards start in `ns` as well, and every socket it
/// opens belongs to `ns`.
pub fn enter(ns: &str) {
    let path = format!("/var/run/netns/{ns}");
    let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("cannot open {path}: {e}"));
    nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
        .unwrap_or_else(|e| panic!("setns into {ns} failed: {e}"));
}

/// Runs `f` on a new OS thread inside network namespace `ns`, with a current-thread tokio
/// runtime of its own (so every task, and every socket they open, stays on that thread, in
/// `ns`). The thread's result (or its panic) comes back through the handle.
pub fn run_in<T, F>(ns: &str, name: &str, f: impl FnOnce() -> F + Send + 'static) -> std::thread::JoinHandle<T>
where
    F: std::future::Future<Output = T>,
    T: Send + 'static,
{
    let ns = ns.to_owned();
    std::thread::Builder::new()
        .name(name.to_owned())
        .spawn(move || {
            enter(&ns);
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            runtime.block_on(f())
        })
        .unwrap()
}
