//! Everything marmot asks of the operating system that is not the same on every Unix, in one
//! place: the Linux way behind `cfg(target_os = "linux")`, and a portable way for the others
//! (macOS, the BSDs). Building with the feature `portable` takes the portable way on Linux
//! too, so that CI runs it (`cargo test -p marmot --features portable --lib platform`).
//!
//! What differs:
//! - a child that dies with its parent: Linux's parent-death signal; elsewhere nothing, and
//!   the pid file checked at the next start stops a server a killed marmot left behind;
//! - what command a process runs: Linux's `/proc/<pid>/cmdline`; elsewhere `ps -o command=`;
//! - a stable machine identity for the default node id: Linux's `/etc/machine-id`;
//!   elsewhere the host's name (macOS's hardware UUID needs `ioreg`, which may be absent).
//!
//! POSIX calls (`kill`, `flock`, `gethostname`) are used directly elsewhere: they are the
//! same on every Unix. Windows is not supported.

use std::path::Path;
use std::process::Command;

#[cfg(all(target_os = "linux", not(feature = "portable")))]
mod imp {
    use std::os::unix::process::CommandExt;

    pub fn die_with_parent(cmd: &mut std::process::Command) {
        // SAFETY: prctl in the child before exec; async-signal-safe.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
    }

    pub fn command_line(pid: i32) -> Option<String> {
        let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        Some(
            raw.split(|&b| b == 0)
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect::<Vec<_>>()
                .join(" ")
                .trim()
                .to_string(),
        )
    }

    pub fn machine_id() -> Option<String> {
        ["/etc/machine-id", "/var/lib/dbus/machine-id"]
            .iter()
            .find_map(|p| std::fs::read_to_string(p).ok())
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
    }

    pub const DIES_WITH_PARENT: bool = true;
}

#[cfg(not(all(target_os = "linux", not(feature = "portable"))))]
mod imp {
    pub fn die_with_parent(_cmd: &mut std::process::Command) {}

    pub fn command_line(pid: i32) -> Option<String> {
        let out = std::process::Command::new("ps")
            .args(["-p", &pid.to_string(), "-o", "command="])
            .output()
            .ok()?;
        let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
        (out.status.success() && !text.is_empty()).then_some(text)
    }

    pub fn machine_id() -> Option<String> {
        Some(super::host_name()).filter(|h| h != "unknown-host")
    }

    pub const DIES_WITH_PARENT: bool = false;
}

/// Keeps the allocator to two arenas (glibc): by default it gives each thread that allocates
/// an arena of its own, and SQLite's work moves between the async runtime's blocking
/// threads, so each arena came to hold freed pages of its own and resident memory rose in
/// steps of about 14 MB (bench figure (h)). Called once, first thing. Elsewhere, nothing.
pub fn limit_allocator_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt before any other thread exists only sets an allocator parameter.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

/// Gives memory the allocator holds free back to the system, where the platform can (glibc's
/// `malloc_trim`): a snapshot compresses on several threads, and glibc kept their freed
/// buffers in per-thread arenas, so resident memory rose in steps of about 14 MB at each
/// snapshot (bench figure (h)). Elsewhere, nothing.
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Whether a child started with [`die_with_parent`] is killed when marmot dies, however it
/// dies (true on Linux; elsewhere the next start stops what a killed marmot left behind).
pub const DIES_WITH_PARENT: bool = imp::DIES_WITH_PARENT;

/// Makes the child of `cmd` die with this process, where the platform can.
pub fn die_with_parent(cmd: &mut Command) {
    imp::die_with_parent(cmd)
}

/// The command line process `pid` runs (arguments joined by spaces), if it runs.
pub fn command_line(pid: i32) -> Option<String> {
    imp::command_line(pid)
}

/// Whether process `pid` is a nats-server whose command line names `needle` (its data
/// directory).
pub fn is_nats_server_using(pid: i32, needle: &Path) -> bool {
    command_line(pid).is_some_and(|text| {
        text.contains("nats-server") && text.contains(&*needle.to_string_lossy())
    })
}

/// A stable identity of this machine (for the default node id), if there is one.
pub fn machine_id() -> Option<String> {
    imp::machine_id()
}

/// This host's name.
pub fn host_name() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes into buf.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return "unknown-host".into();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_command_line_is_read() {
        let me = std::process::id() as i32;
        let line = command_line(me).expect("this process runs");
        let exe = std::env::current_exe().unwrap();
        let name = exe.file_name().unwrap().to_string_lossy().into_owned();
        assert!(line.contains(&name), "{line:?} does not name {name}");
        assert!(command_line(i32::MAX).is_none(), "no such process");
    }

    #[test]
    fn a_sleeping_child_is_not_taken_for_a_nats_server() {
        let mut child = Command::new("sleep").arg("30").spawn().unwrap();
        let pid = child.id() as i32;
        // Right after the fork the child still shows this test's command line, until it execs.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !command_line(pid).unwrap_or_default().contains("sleep") {
            assert!(
                std::time::Instant::now() < deadline,
                "{:?}",
                command_line(pid)
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert!(!is_nats_server_using(pid, Path::new("/tmp")));
        child.kill().unwrap();
        child.wait().unwrap();
    }

    #[test]
    fn the_machine_has_an_identity_and_a_name() {
        assert!(machine_id().is_some_and(|m| !m.is_empty()));
        assert!(!host_name().is_empty());
    }
}
