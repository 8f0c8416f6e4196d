//! Running a server for a class: it outlives the terminal it was started
//! from when started under `nohup`, and stops on SIGHUP otherwise.

mod common;

use common::*;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::os::unix::process::CommandExt;

/// Send SIGHUP, then SIGTERM, and return the server's log. Pending signals
/// are read lowest number first, so a SIGHUP the server listens to is the
/// one its log names.
fn hup_then_term(mut c: Cluster) -> String {
    let pid = Pid::from_raw(c.pid() as i32);
    kill(pid, Signal::SIGHUP).unwrap();
    // Whatever it did with the SIGHUP, it is done before it answers this.
    let alive = c.cloud(&["status", "1"]);
    let answered = String::from_utf8_lossy(&alive.stderr).contains("no such ticket");
    c.terminate();
    format!("answered after SIGHUP: {answered}\n{}", c.log())
}

#[test]
fn a_server_started_under_nohup_outlives_sighup() {
    let c = Cluster::start_tweaked(1, &[], |cmd| {
        // SAFETY: signal() is async-signal-safe; this is what nohup does before exec.
        unsafe {
            cmd.pre_exec(|| {
                libc::signal(libc::SIGHUP, libc::SIG_IGN);
                Ok(())
            });
        }
    });
    let log = hup_then_term(c);
    assert!(log.contains("answered after SIGHUP: true"), "{log}");
    assert!(log.contains("SIGTERM: stopping") && !log.contains("SIGHUP: stopping"), "{log}");
}

#[test]
fn a_server_on_a_terminal_stops_on_sighup() {
    let log = hup_then_term(Cluster::start(1));
    assert!(log.contains("SIGHUP: stopping"), "{log}");
}
