//! The Python client library (examples/python/tether_client) against this relay binary: runs its
//! unittest suite (examples/python/tests) with Debian's python3 and python3-websockets, so
//! `cargo test --workspace` (`make test`) covers it.

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const PYTHON: &str = "/usr/bin/python3";
/// The suite takes about 4 s; this only stops a hung run.
const LIMIT: Duration = Duration::from_secs(240);

#[test]
fn python_client_suite() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let probe = Command::new(PYTHON)
        .args(["-c", "import sys, websockets; sys.exit(int(websockets.__version__.split('.')[0]) < 10)"])
        .output();
    match probe {
        Ok(out) if out.status.success() => {}
        Ok(out) => panic!(
            "{PYTHON} cannot import websockets >= 10 (Debian package python3-websockets): run make deps\n{}",
            String::from_utf8_lossy(&out.stderr)
        ),
        Err(e) => panic!("{PYTHON} is missing ({e}): run make deps (Debian packages python3, python3-websockets)"),
    }

    let mut child = Command::new(PYTHON)
        .args(["-m", "unittest", "discover", "-s", "examples/python/tests", "-v"])
        .current_dir(root)
        .env("TETHER_RELAY_BIN", env!("CARGO_BIN_EXE_tether-relay"))
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env("PYTHONUNBUFFERED", "1")
        .env_remove("TETHER_PY_DEBUG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 starts");
    // Drain both pipes in threads so a chatty run cannot block on a full pipe.
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let out_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if started.elapsed() > LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let out = out_reader.join().unwrap();
    let err = err_reader.join().unwrap();
    match status {
        Some(s) if s.success() => {
            eprintln!("python client suite passed in {:.1} s\n{err}", started.elapsed().as_secs_f64());
        }
        Some(s) => panic!("the Python client suite failed ({s}):\n--- stdout\n{out}\n--- stderr\n{err}"),
        None => {
            panic!("the Python client suite did not finish within {LIMIT:?}:\n--- stdout\n{out}\n--- stderr\n{err}")
        }
    }
}
