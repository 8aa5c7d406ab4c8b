//! The traffic capture a pod's init container installs (`lumen-init`), as
//! Istio's `istio-iptables` does: in the pod's network namespace, the
//! app's outbound TCP is redirected to the sidecar's outbound port and
//! inbound TCP to its inbound port, except the sidecar's own traffic (by
//! its uid), loopback, and the ports and ranges excluded. The rules go in
//! with one `iptables-restore` into chains of Lumen's own, so installing
//! twice replaces rather than duplicates them.

use std::io::Write;
use std::process::{Command, Stdio};

use clap::Args;

/// Where traffic goes and what is left alone.
#[derive(Args, Debug, Clone)]
pub struct CaptureArgs {
    /// The sidecar's outbound listener port.
    #[arg(long, default_value_t = 15001)]
    pub outbound_port: u16,
    /// The sidecar's inbound listener port.
    #[arg(long, default_value_t = 15006)]
    pub inbound_port: u16,
    /// The uid the sidecar runs as: its own connections are not captured.
    #[arg(long, default_value_t = 1337)]
    pub proxy_uid: u32,
    /// Destinations captured, as CIDRs (repeatable; `*` every one).
    #[arg(long = "include-outbound-cidr", default_value = "*")]
    pub include_outbound: Vec<String>,
    /// Destinations never captured, as CIDRs (repeatable).
    #[arg(long = "exclude-outbound-cidr")]
    pub exclude_outbound: Vec<String>,
    /// Destination ports never captured (repeatable).
    #[arg(long = "exclude-outbound-port")]
    pub exclude_outbound_ports: Vec<u16>,
    /// Inbound ports left to reach the pod directly (repeatable), beyond
    /// the sidecar's own (its listeners and admin).
    #[arg(long = "exclude-inbound-port")]
    pub exclude_inbound_ports: Vec<u16>,
    /// The sidecar's admin port (kubelet probes and stats reach it
    /// directly).
    #[arg(long, default_value_t = 15020)]
    pub admin_port: u16,
    /// Leave inbound traffic alone.
    #[arg(long)]
    pub no_inbound: bool,
    /// Leave outbound traffic alone (Istio's empty
    /// `includeOutboundIPRanges`).
    #[arg(long)]
    pub no_outbound: bool,
    /// Print the rules instead of installing them.
    #[arg(long)]
    pub dry_run: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("`{0}` is not a CIDR (like 10.96.0.0/12)")]
    Cidr(String),
    #[error(
        "cannot run iptables-restore (is iptables installed, and does the container have NET_ADMIN?): {0}"
    )]
    Spawn(std::io::Error),
    #[error("iptables-restore refused the rules ({status}): {stderr}")]
    Refused { status: String, stderr: String },
}

/// An IPv4 range (or lone address), as the mesh's subnets are read.
fn check_cidr(c: &str) -> Result<(), CaptureError> {
    if lumen_core::networking::virtual_service::parse_subnet(c).is_some_and(|(ip, _)| ip.is_ipv4())
    {
        Ok(())
    } else {
        Err(CaptureError::Cidr(c.to_string()))
    }
}

/// The `iptables-restore` input for the nat table.
pub fn rules(a: &CaptureArgs) -> Result<String, CaptureError> {
    for c in a
        .exclude_outbound
        .iter()
        .chain(a.include_outbound.iter().filter(|c| *c != "*"))
    {
        check_cidr(c)?;
    }
    let mut r = String::from("*nat\n");
    for chain in [
        "LUMEN_INBOUND",
        "LUMEN_IN_REDIRECT",
        "LUMEN_OUTPUT",
        "LUMEN_REDIRECT",
    ] {
        r.push_str(&format!(":{chain} - [0:0]\n"));
    }
    r.push_str(&format!(
        "-A LUMEN_REDIRECT -p tcp -j REDIRECT --to-ports {}\n",
        a.outbound_port
    ));
    r.push_str(&format!(
        "-A LUMEN_IN_REDIRECT -p tcp -j REDIRECT --to-ports {}\n",
        a.inbound_port
    ));
    if !a.no_inbound {
        r.push_str("-A PREROUTING -p tcp -j LUMEN_INBOUND\n");
        let mut own = vec![a.admin_port, a.outbound_port, a.inbound_port];
        own.extend(&a.exclude_inbound_ports);
        own.sort_unstable();
        own.dedup();
        for port in own {
            r.push_str(&format!(
                "-A LUMEN_INBOUND -p tcp --dport {port} -j RETURN\n"
            ));
        }
        r.push_str("-A LUMEN_INBOUND -p tcp -j LUMEN_IN_REDIRECT\n");
    }
    if a.no_outbound {
        r.push_str("COMMIT\n");
        return Ok(r);
    }
    r.push_str("-A OUTPUT -p tcp -j LUMEN_OUTPUT\n");
    // The sidecar's own connections (to upstreams, the control plane, the
    // collector) go out as they are.
    r.push_str(&format!(
        "-A LUMEN_OUTPUT -m owner --uid-owner {} -j RETURN\n",
        a.proxy_uid
    ));
    r.push_str("-A LUMEN_OUTPUT -d 127.0.0.1/32 -j RETURN\n");
    let mut ports = a.exclude_outbound_ports.clone();
    ports.sort_unstable();
    ports.dedup();
    for port in ports {
        r.push_str(&format!(
            "-A LUMEN_OUTPUT -p tcp --dport {port} -j RETURN\n"
        ));
    }
    for cidr in &a.exclude_outbound {
        r.push_str(&format!("-A LUMEN_OUTPUT -d {cidr} -j RETURN\n"));
    }
    if a.include_outbound.iter().any(|c| c == "*") {
        r.push_str("-A LUMEN_OUTPUT -j LUMEN_REDIRECT\n");
    } else {
        for cidr in &a.include_outbound {
            r.push_str(&format!("-A LUMEN_OUTPUT -d {cidr} -j LUMEN_REDIRECT\n"));
        }
    }
    r.push_str("COMMIT\n");
    Ok(r)
}

/// Installs the rules (`--noflush`: the table's other rules stay; Lumen's
/// chains are declared, and so emptied, before they are filled). A second
/// run would add the jumps from PREROUTING and OUTPUT again, so they are
/// removed first when present.
pub fn install(a: &CaptureArgs) -> Result<String, CaptureError> {
    let text = rules(a)?;
    if a.dry_run {
        return Ok(text);
    }
    for (chain, target) in [("PREROUTING", "LUMEN_INBOUND"), ("OUTPUT", "LUMEN_OUTPUT")] {
        // Absent the first time: the error is expected and ignored.
        let _ = Command::new("iptables")
            .args(["-t", "nat", "-D", chain, "-p", "tcp", "-j", target])
            .stderr(Stdio::null())
            .status();
    }
    let mut child = Command::new("iptables-restore")
        .arg("--noflush")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(CaptureError::Spawn)?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(text.as_bytes())
            .map_err(CaptureError::Spawn)?;
    }
    let out = child.wait_with_output().map_err(CaptureError::Spawn)?;
    if !out.status.success() {
        return Err(CaptureError::Refused {
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct T {
        #[command(flatten)]
        a: CaptureArgs,
    }

    fn args(flags: &[&str]) -> CaptureArgs {
        let mut argv = vec!["lumen-init"];
        argv.extend(flags);
        T::parse_from(argv).a
    }

    #[test]
    fn the_sidecars_own_traffic_and_ports_are_left_alone() {
        let r = rules(&args(&[])).unwrap();
        let lines: Vec<&str> = r.lines().collect();
        // Everything else outbound goes to 15001, inbound to 15006.
        assert!(lines.contains(&"-A LUMEN_REDIRECT -p tcp -j REDIRECT --to-ports 15001"));
        assert!(lines.contains(&"-A LUMEN_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006"));
        // The sidecar's own connections return before the redirect.
        let own = lines
            .iter()
            .position(|l| *l == "-A LUMEN_OUTPUT -m owner --uid-owner 1337 -j RETURN")
            .unwrap();
        let redirect = lines
            .iter()
            .position(|l| *l == "-A LUMEN_OUTPUT -j LUMEN_REDIRECT")
            .unwrap();
        assert!(own < redirect);
        for port in [15001, 15006, 15020] {
            assert!(
                lines.contains(
                    &format!("-A LUMEN_INBOUND -p tcp --dport {port} -j RETURN").as_str()
                ),
                "{r}"
            );
        }
        assert_eq!(lines.last(), Some(&"COMMIT"));
    }

    #[test]
    fn only_the_ranges_asked_for_are_captured_and_bad_ones_are_named() {
        let r = rules(&args(&[
            "--include-outbound-cidr",
            "10.96.0.0/12",
            "--exclude-outbound-port",
            "5432",
            "--no-inbound",
        ]))
        .unwrap();
        assert!(r.contains("-A LUMEN_OUTPUT -d 10.96.0.0/12 -j LUMEN_REDIRECT\n"));
        assert!(!r.contains("-A LUMEN_OUTPUT -j LUMEN_REDIRECT\n"));
        assert!(r.contains("--dport 5432 -j RETURN"));
        assert!(!r.contains("PREROUTING"));
        let none = rules(&args(&["--no-outbound"])).unwrap();
        assert!(!none.contains("-A OUTPUT"), "{none}");
        assert!(none.contains("-A PREROUTING -p tcp -j LUMEN_INBOUND"));
        let e = rules(&args(&["--include-outbound-cidr", "10.96.0.0/99"])).unwrap_err();
        assert_eq!(
            e.to_string(),
            "`10.96.0.0/99` is not a CIDR (like 10.96.0.0/12)"
        );
    }
}
