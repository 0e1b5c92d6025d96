//! The console's browser suite (client-web/e2e/suite.mjs): everything a pilot and a fleet admin
//! do, in Debian's chromium driven by playwright-core, against the real `tether-relay` binary
//! (restarted once under the console), the real agent streaming its test pattern, a second
//! agent onboarding with a handshake key, and the simulated boat (`tether-boat`) answering
//! waypoints and teleop on the agent's local socket. The suite lists its steps; screenshots
//! of every screen land in target/screenshots/console-suite/. `make test` installs chromium
//! and playwright-core (see .ci/install-deps.sh).

mod common;
use common::browser::*;

#[tokio::test]
async fn the_console_does_what_pilots_and_admins_do() {
    run_console_script("suite.mjs", "console-suite", "console suite: all steps passed", &[]).await;
}
