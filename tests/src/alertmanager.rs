//! A real Alertmanager (Debian's `prometheus-alertmanager`) on a port of
//! its own, for the policy engine's tests: Lumen sends it alerts, and it
//! calls Lumen's webhook.

use std::process::{Child, Command};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::{free_port, peer_tool};

/// Killed on drop.
pub struct Alertmanager {
    child: Child,
    pub url: String,
    _dir: tempfile::TempDir,
}

impl Alertmanager {
    /// Starts one whose only receiver posts to `webhook` (if given), with
    /// no waiting: a new alert goes out at once, a resolved one within a
    /// second.
    pub async fn start(webhook: Option<&str>) -> Result<Self> {
        let bin = peer_tool(
            "prometheus-alertmanager",
            "apt-get install -y prometheus-alertmanager",
        );
        let dir = tempfile::tempdir()?;
        let config = dir.path().join("alertmanager.yml");
        let receiver = match webhook {
            Some(url) => format!(
                "- name: lumen\n  webhook_configs:\n  - url: {url}\n    send_resolved: true\n"
            ),
            None => "- name: lumen\n".to_string(),
        };
        std::fs::write(
            &config,
            format!(
                "route:\n  receiver: lumen\n  group_by: [alertname]\n  group_wait: 0s\n  group_interval: 1s\n  repeat_interval: 1h\nreceivers:\n{receiver}"
            ),
        )?;
        let port = free_port();
        let log = std::fs::File::create(dir.path().join("alertmanager.log"))?;
        let child = Command::new(bin)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            // One instance: no gossip port to collide with anything.
            .arg("--cluster.listen-address=")
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting alertmanager")?;
        let am = Alertmanager {
            child,
            url: format!("http://127.0.0.1:{port}"),
            _dir: dir,
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while reqwest::get(format!("{}/-/ready", am.url))
            .await
            .map_or(true, |r| !r.status().is_success())
        {
            if std::time::Instant::now() > deadline {
                bail!("alertmanager did not become ready");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Ok(am)
    }
}

impl Drop for Alertmanager {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
