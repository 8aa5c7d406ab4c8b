//! An S3 endpoint on loopback for object-store tests: moto's server (the
//! README's test command installs it), one bucket, and an unsigned listing.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::{free_port, python};

pub const ACCESS_KEY: &str = "lumen-test";
pub const SECRET_KEY: &str = "lumen-test-secret";
pub const REGION: &str = "us-east-1";

/// `moto_server` on 127.0.0.1; killed when dropped.
pub struct Moto {
    child: Child,
    pub port: u16,
}

impl Moto {
    /// Starts moto and creates `bucket` in it.
    pub async fn start(bucket: &str) -> Result<Moto> {
        let port = free_port();
        let child = Command::new(python())
            .args([
                "-m",
                "moto.server",
                "-H",
                "127.0.0.1",
                "-p",
                &port.to_string(),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context(
                "starting moto_server (pip install 'moto[server]'; ./scripts/test.sh does it)",
            )?;
        let mut moto = Moto { child, port };
        let client = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = moto.child.try_wait()? {
                bail!(
                    "moto_server exited with {status}; is moto[server] installed? (./scripts/test.sh installs it)"
                );
            }
            if let Ok(r) = client.put(moto.url(bucket)).send().await
                && r.status().is_success()
            {
                return Ok(moto);
            }
            if Instant::now() > deadline {
                bail!("moto_server did not answer on port {port} within 30s");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn url(&self, path: &str) -> String {
        format!("{}/{path}", self.endpoint())
    }

    /// The `--store-option`s that reach this endpoint.
    pub fn store_options(&self) -> Vec<String> {
        [
            format!("aws_endpoint={}", self.endpoint()),
            "aws_allow_http=true".into(),
            format!("aws_access_key_id={ACCESS_KEY}"),
            format!("aws_secret_access_key={SECRET_KEY}"),
            format!("aws_region={REGION}"),
        ]
        .into_iter()
        .flat_map(|o| ["--store-option".to_string(), o])
        .collect()
    }

    /// Keys of `bucket` under `prefix` (ListObjectsV2, every page).
    pub async fn keys(&self, bucket: &str, prefix: &str) -> Result<Vec<String>> {
        let client = reqwest::Client::new();
        let mut keys = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let mut query = vec![
                ("list-type", "2".to_string()),
                ("prefix", prefix.to_string()),
            ];
            if let Some(t) = &token {
                query.push(("continuation-token", t.clone()));
            }
            let query: String = form_urlencoded::Serializer::new(String::new())
                .extend_pairs(&query)
                .finish();
            let body = client
                .get(format!("{}?{query}", self.url(bucket)))
                .send()
                .await?
                .error_for_status()?
                .text()
                .await?;
            keys.extend(between_all(&body, "<Key>", "</Key>"));
            token = between_all(&body, "<NextContinuationToken>", "</NextContinuationToken>")
                .into_iter()
                .next();
            if token.is_none() {
                break;
            }
        }
        keys.sort();
        Ok(keys)
    }
}

fn between_all(text: &str, open: &str, close: &str) -> Vec<String> {
    text.split(open)
        .skip(1)
        .filter_map(|s| s.split_once(close).map(|(v, _)| v.to_string()))
        .collect()
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
