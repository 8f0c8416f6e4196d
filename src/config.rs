//! Reading `cloud_nodes.txt`: first line N, then N node lines.
//!
//! A node line is `PORT` (a node in the server's own process, on
//! 127.0.0.1:PORT; `0` takes a free port, named once bound), `HOST:PORT` (a `cloud-server node` elsewhere; an IPv6
//! host in brackets, `[::1]:9001`) or `slurm:PARTITION`, each optionally
//! followed by `slots=K` (K >= 1, default 1). The original format (N, then
//! N ports) is the first kind only. Blank lines are skipped.
//!
//! Owns: the file format and its error messages, each naming the line.
//! Must not touch: sockets (binding and connecting are the server's; it
//! names the line of a node it cannot use with `NodeSpec::line`).

use std::path::Path;

/// Most replicas one node line may ask to run at once.
pub const MAX_SLOTS: u32 = 256;

/// What a node line names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeKind {
    /// A node in the server's own process, on 127.0.0.1:`port`.
    Local { port: u16 },
    /// A `cloud-server node --listen HOST:PORT` the main server connects to.
    Remote { host: String, port: u16 },
    /// Replicas run through Slurm in this partition.
    Slurm { partition: String },
}

/// One node line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeSpec {
    pub kind: NodeKind,
    /// Replicas the node may run at once (`slots=K`, default 1).
    pub slots: u32,
    /// The 1-based line it was given on.
    pub line: usize,
}

impl NodeSpec {
    /// The node's name as the ready line, STATUS and logs show it.
    pub fn name(&self) -> String {
        match &self.kind {
            NodeKind::Local { port } => format!("127.0.0.1:{port}"),
            NodeKind::Remote { host, port } if host.contains(':') => format!("[{host}]:{port}"),
            NodeKind::Remote { host, port } => format!("{host}:{port}"),
            NodeKind::Slurm { partition } => format!("slurm:{partition}"),
        }
    }
}

/// The parsed node list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodesFile {
    pub nodes: Vec<NodeSpec>,
}

impl NodesFile {
    pub fn load(path: &Path) -> Result<NodesFile, String> {
        let text =
            std::fs::read_to_string(path).map_err(|e| format!("cannot read nodes file {}: {e}", path.display()))?;
        Self::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Parse the text; errors say which line and what to fix.
    pub fn parse(text: &str) -> Result<NodesFile, String> {
        let mut lines = text.lines().enumerate().map(|(i, l)| (i + 1, l.trim())).filter(|(_, l)| !l.is_empty());
        let (first, count) = lines.next().ok_or("the file is empty; line 1 must give the number of nodes")?;
        let n: usize = count
            .parse()
            .map_err(|_| format!("line {first}: '{count}' is not a node count; line 1 must be a number N"))?;
        if n == 0 {
            return Err(format!("line {first}: the node count must be at least 1"));
        }
        let mut nodes: Vec<NodeSpec> = Vec::with_capacity(n);
        for (line, text) in lines {
            if nodes.len() == n {
                return Err(format!("line {line}: more nodes than the {n} announced on line {first}"));
            }
            let spec = parse_line(line, text)?;
            // Port 0 (any free port) may repeat: each gets its own.
            if !matches!(spec.kind, NodeKind::Slurm { .. } | NodeKind::Local { port: 0 }) {
                if let Some(other) = nodes.iter().find(|o| o.kind == spec.kind) {
                    return Err(format!("line {line}: {} is a duplicate of line {}", describe(&spec), other.line));
                }
            }
            nodes.push(spec);
        }
        if nodes.len() != n {
            return Err(format!("line {first} announces {n} nodes but the file lists {}", nodes.len()));
        }
        Ok(NodesFile { nodes })
    }

    /// Each node's name (`NodeSpec::name`), except that Slurm lines of one
    /// partition given more than once are told apart: `slurm:batch#1`,
    /// `slurm:batch#2`, ... in file order ('#' is never in a partition name).
    pub fn names(&self) -> Vec<String> {
        let partition = |s: &NodeSpec| match &s.kind {
            NodeKind::Slurm { partition } => Some(partition.clone()),
            _ => None,
        };
        let mut seen = std::collections::HashMap::new();
        self.nodes
            .iter()
            .map(|spec| match partition(spec) {
                Some(p) if self.nodes.iter().filter(|o| partition(o).as_ref() == Some(&p)).count() > 1 => {
                    let k = seen.entry(p).or_insert(0);
                    *k += 1;
                    format!("{}#{k}", spec.name())
                }
                _ => spec.name(),
            })
            .collect()
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// `slots()[i]`: how many replicas node i runs at once (at least 1).
    pub fn slots(&self) -> Vec<u32> {
        self.nodes.iter().map(|s| s.slots).collect()
    }

    /// Slots of every node together (slot uids are handed out in this
    /// order: node i slot s is the `slot_offset(i) + s`th).
    pub fn total_slots(&self) -> usize {
        self.nodes.iter().map(|s| s.slots as usize).sum()
    }

    /// The index of node i's first slot among all slots.
    pub fn slot_offset(&self, i: usize) -> usize {
        self.nodes[..i].iter().map(|s| s.slots as usize).sum()
    }

    /// The line node `index` was given on.
    pub fn line_of(&self, index: usize) -> usize {
        self.nodes[index].line
    }
}

fn describe(spec: &NodeSpec) -> String {
    match &spec.kind {
        NodeKind::Local { port } => format!("port {port}"),
        _ => format!("node {}", spec.name()),
    }
}

fn parse_line(line: usize, text: &str) -> Result<NodeSpec, String> {
    let mut words = text.split_whitespace();
    let what = words.next().unwrap_or_default();
    let mut slots = 1;
    for word in words {
        let k = word.strip_prefix("slots=").ok_or_else(|| {
            format!("line {line}: '{word}' is not understood; after the node only slots=K may follow")
        })?;
        slots = match k.parse::<u32>() {
            Ok(k) if (1..=MAX_SLOTS).contains(&k) => k,
            _ => return Err(format!("line {line}: slots={k}: give a number of slots from 1 to {MAX_SLOTS}")),
        };
    }
    let kind = if let Some(partition) = what.strip_prefix("slurm:") {
        let ok = !partition.is_empty()
            && partition.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        if !ok {
            return Err(format!("line {line}: '{partition}' is not a Slurm partition name (letters, digits, - _ .)"));
        }
        NodeKind::Slurm { partition: partition.to_string() }
    } else if let Some((host, port)) = what.rsplit_once(':') {
        let port = parse_port(line, port, what)?;
        let host = match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
            Some(v6) if v6.parse::<std::net::Ipv6Addr>().is_ok() => v6.to_string(),
            Some(_) => return Err(format!("line {line}: '{host}' is not an IPv6 address")),
            None if host.contains(':') => {
                return Err(format!("line {line}: '{what}': write an IPv6 host in brackets, [ADDR]:PORT"))
            }
            None if valid_host(host) => host.to_string(),
            None => return Err(format!("line {line}: '{host}' is not a host name or address")),
        };
        NodeKind::Remote { host, port }
    } else {
        // 0: a free port, picked when the server binds it.
        match what {
            "0" => NodeKind::Local { port: 0 },
            _ => NodeKind::Local { port: parse_port(line, what, what)? },
        }
    };
    Ok(NodeSpec { kind, slots, line })
}

fn parse_port(line: usize, port: &str, what: &str) -> Result<u16, String> {
    let port: u32 = port
        .parse()
        .map_err(|_| format!("line {line}: '{what}' is not a port number, HOST:PORT or slurm:PARTITION"))?;
    if !(1..=65535).contains(&port) {
        return Err(format!("line {line}: port {port} is out of range (1-65535)"));
    }
    Ok(port as u16)
}

fn valid_host(host: &str) -> bool {
    !host.is_empty()
        && host.len() <= 253
        && host.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
        && !host.starts_with('-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_format_parses() {
        let f = NodesFile::parse("4\n9001\n9002\n9003\n9004\n").unwrap();
        let ports: Vec<_> = f.nodes.iter().map(|s| s.kind.clone()).collect();
        assert_eq!(ports, [9001, 9002, 9003, 9004].map(|port| NodeKind::Local { port }));
        assert!(f.nodes.iter().all(|s| s.slots == 1));
        assert_eq!(f.line_of(2), 4);
    }

    #[test]
    fn a_node_line_may_give_slots() {
        let f = NodesFile::parse("3\n9001 slots=2\n9002\n9003   slots=4\n").unwrap();
        assert_eq!(f.slots(), vec![2, 1, 4]);
        assert_eq!((f.total_slots(), f.slot_offset(2)), (7, 3));
        for (text, want) in [
            ("1\n9001 slots=0\n", "line 2: slots=0: give a number of slots from 1 to 256"),
            ("1\n9001 slots=x\n", "line 2: slots=x"),
            ("1\n9001 cores=2\n", "line 2: 'cores=2' is not understood"),
        ] {
            let err = NodesFile::parse(text).unwrap_err();
            assert!(err.contains(want), "{err:?} should contain {want:?}");
        }
    }

    #[test]
    fn remote_slurm_and_slots_parse() {
        let f = NodesFile::parse(
            "5\n9001 slots=4\n10.0.0.7:9001\nnode-b.example:9100  slots=2\n[::1]:9002\nslurm:batch slots=16\n",
        )
        .unwrap();
        let got: Vec<_> = f.nodes.iter().map(|s| (s.kind.clone(), s.slots, s.line)).collect();
        assert_eq!(
            got,
            vec![
                (NodeKind::Local { port: 9001 }, 4, 2),
                (NodeKind::Remote { host: "10.0.0.7".into(), port: 9001 }, 1, 3),
                (NodeKind::Remote { host: "node-b.example".into(), port: 9100 }, 2, 4),
                (NodeKind::Remote { host: "::1".into(), port: 9002 }, 1, 5),
                (NodeKind::Slurm { partition: "batch".into() }, 16, 6),
            ]
        );
        assert_eq!(f.nodes[3].name(), "[::1]:9002");
        assert_eq!(f.nodes[0].name(), "127.0.0.1:9001");
    }

    #[test]
    fn slurm_lines_of_one_partition_get_names_of_their_own() {
        let f = NodesFile::parse("4\nslurm:a\n9001\nslurm:b slots=2\nslurm:a\n").unwrap();
        assert_eq!(f.names(), ["slurm:a#1", "127.0.0.1:9001", "slurm:b", "slurm:a#2"]);
    }

    #[test]
    fn errors_name_the_line() {
        let cases = [
            ("3\n9001\n9002\n", "announces 3 nodes but the file lists 2"),
            ("2\n9001\nabc\n", "line 3: 'abc' is not a port"),
            ("2\n9001\n9001\n", "line 3: port 9001 is a duplicate of line 2"),
            ("1\n70000\n", "line 2: port 70000 is out of range"),
            ("x\n", "line 1: 'x' is not a node count"),
            ("1\n9001\n9002\n", "line 3: more nodes"),
            ("", "empty"),
            ("1\n9001 slots=0\n", "line 2: slots=0: give a number of slots from 1 to 256"),
            ("1\n9001 slots=x\n", "line 2: slots=x"),
            ("1\n9001 fast\n", "line 2: 'fast' is not understood"),
            ("2\nh:9001\nh:9001\n", "line 3: node h:9001 is a duplicate of line 2"),
            ("1\nh:0\n", "line 2: port 0 is out of range"),
            ("1\nh:x\n", "line 2: 'h:x' is not a port number"),
            ("1\n::1:9001\n", "in brackets"),
            ("1\nslurm:\n", "line 2: '' is not a Slurm partition"),
            ("1\nbad/host:9001\n", "line 2: 'bad/host' is not a host"),
        ];
        for (text, want) in cases {
            let err = NodesFile::parse(text).unwrap_err();
            assert!(err.contains(want), "{err:?} should contain {want:?}");
        }
    }
}
