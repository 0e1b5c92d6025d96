//! The console in Firefox (client-web/e2e/firefox.mjs): Debian's firefox-esr driven by
//! playwright-core over WebDriver BiDi against the real `tether-relay` binary, the real agent
//! streaming its test pattern on its default `video.codec` (`auto`), which must answer Firefox in
//! VP8 (Firefox decodes H.264 only through the OpenH264 plugin it downloads at run time, so it
//! offers none here), and the simulated boat (`tether-boat`). Login, fleet, VP8 video, telemetry
//! and plots, track, the control lease, waypoints, teleop, a command, the log console, the STALE
//! banner while the agent is frozen, a pilot's password login; any error a page reports fails it.
//! Screenshots land in target/screenshots/console-firefox/. `make test` installs firefox-esr and
//! playwright-core (see .ci/install-deps.sh); FIREFOX names another Firefox binary.

mod common;
use std::path::PathBuf;

use common::browser::*;

#[tokio::test]
async fn the_console_works_in_firefox() {
    let firefox = std::env::var_os("FIREFOX").map(PathBuf::from).unwrap_or_else(|| "/usr/bin/firefox-esr".into());
    assert!(
        firefox.exists(),
        "{} is missing: run `make deps` (installs Debian's firefox-esr) or set FIREFOX",
        firefox.display()
    );
    run_console_script(
        "firefox.mjs",
        "console-firefox",
        "console in firefox: all steps passed",
        &[("FIREFOX", firefox.as_os_str())],
    )
    .await;
}
