//! What can be checked of the images without Docker (none runs here):
//! `deploy/Dockerfile` has the two targets the manifests name, builds the
//! packages and binaries that exist, copies what it built into the
//! runtime stages, runs their entrypoints as a non-root user.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{Context, Result};

fn repo() -> PathBuf {
    lumen_tests::crate_dir().join("..")
}

/// One stage of a Dockerfile: its instructions, continuation lines joined.
#[derive(Debug, Default)]
struct Stage {
    instructions: Vec<(String, String)>,
}

impl Stage {
    fn all(&self, op: &str) -> impl Iterator<Item = &str> {
        self.instructions
            .iter()
            .filter(move |(o, _)| o == op)
            .map(|(_, a)| a.as_str())
    }
}

fn stages(dockerfile: &str) -> BTreeMap<String, Stage> {
    let mut out: BTreeMap<String, Stage> = BTreeMap::new();
    let mut current: Option<String> = None;
    let mut logical = String::new();
    for line in dockerfile.lines() {
        let line = line.trim();
        if line.starts_with('#') || line.is_empty() && logical.is_empty() {
            continue;
        }
        if let Some(head) = line.strip_suffix('\\') {
            logical.push_str(head);
            logical.push(' ');
            continue;
        }
        logical.push_str(line);
        let text = std::mem::take(&mut logical);
        let (op, args) = text.split_once(' ').unwrap_or((text.as_str(), ""));
        let op = op.to_uppercase();
        if op == "FROM" {
            let name = args
                .split_whitespace()
                .collect::<Vec<_>>()
                .windows(2)
                .find(|w| w[0].eq_ignore_ascii_case("AS"))
                .map(|w| w[1].to_string())
                .unwrap_or_default();
            current = Some(name.clone());
            out.entry(name).or_default();
        }
        if let Some(stage) = current.as_ref().and_then(|n| out.get_mut(n)) {
            stage.instructions.push((op, args.trim().to_string()));
        }
    }
    out
}

#[test]
fn the_dockerfile_builds_both_binaries_and_runs_them_as_non_root() -> Result<()> {
    let text =
        std::fs::read_to_string(repo().join("deploy/Dockerfile")).context("deploy/Dockerfile")?;
    let stages = stages(&text);
    let build = stages.get("build").context("a `build` stage")?;
    let run = build.all("RUN").collect::<Vec<_>>().join(" ");
    // The packages it builds exist, with the binaries it copies out.
    let packages = [
        ("lumen", "cli", "lumen"),
        ("lumen-sidecar", "sidecar", "lumen-proxy"),
    ];
    for (package, dir, bin) in packages {
        assert!(run.contains(&format!("-p {package}")), "{run}");
        let manifest = std::fs::read_to_string(repo().join(dir).join("Cargo.toml"))?;
        assert!(manifest.contains(&format!("name = \"{package}\"")), "{dir}");
        assert!(
            manifest.contains(&format!("name = \"{bin}\"")),
            "{dir}: no bin {bin}"
        );
        assert!(run.contains(&format!("target/release/{bin}")), "{run}");
    }
    // The build starts from the workspace: the files it needs are there.
    assert!(build.all("COPY").any(|c| c == ". ."));
    assert!(repo().join("Cargo.lock").exists());
    assert!(
        repo().join("query/ui/dist/app.js").exists(),
        "the UI is prebuilt"
    );
    let ignore = std::fs::read_to_string(repo().join(".dockerignore"))?;
    assert!(ignore.lines().any(|l| l.trim() == "target/"), "{ignore}");

    for (target, bin) in [("lumen", "lumen"), ("lumen-proxy", "lumen-proxy")] {
        let stage = stages
            .get(target)
            .with_context(|| format!("target {target}"))?;
        let path = format!("/usr/local/bin/{bin}");
        assert!(
            stage
                .all("COPY")
                .any(|c| c.starts_with("--from=build") && c.ends_with(&path)),
            "{target} copies {bin} from the build"
        );
        let entry = stage.all("ENTRYPOINT").last().context("an entrypoint")?;
        assert!(entry.contains(&path), "{target}: {entry}");
        let user = stage.all("USER").last().context("a USER")?;
        let uid = user.split(':').next().unwrap_or("");
        assert!(
            uid != "0" && uid != "root" && !uid.is_empty(),
            "{target} runs as {user}"
        );
    }
    // The sidecar image can install the capture in its init container.
    let proxy = &stages["lumen-proxy"];
    assert!(proxy.all("RUN").any(|r| r.contains("iptables")));
    let sidecar = std::fs::read_to_string(repo().join("sidecar/Cargo.toml"))?;
    assert!(sidecar.contains("name = \"lumen-init\""));
    assert!(run.contains("target/release/lumen-init"), "{run}");
    assert!(
        proxy
            .all("COPY")
            .any(|c| c.starts_with("--from=build") && c.ends_with("/usr/local/bin/lumen-init"))
    );
    Ok(())
}
