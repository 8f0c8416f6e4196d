//! Reading `cloud_nodes.txt`: first line N, then N lines of one unique port,
//! optionally followed by `slots=K` (the node runs up to K replicas at once;
//! default 1).
//!
//! Owns: the file format and its error messages, each naming the line.
//! Must not touch: sockets (binding is the server's; it reports a port in
//! use with `NodesFile::line_of`).

use std::path::Path;

/// Most replicas one node line may ask to run at once.
pub const MAX_SLOTS: u32 = 256;

/// The parsed node list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodesFile {
    pub ports: Vec<u16>,
    /// `slots[i]`: how many replicas node i runs at once (at least 1).
    pub slots: Vec<u32>,
    /// `lines[i]` is the 1-based line of `ports[i]`.
    lines: Vec<usize>,
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
        let mut ports = Vec::with_capacity(n);
        let mut slots = Vec::with_capacity(n);
        let mut at = Vec::with_capacity(n);
        for (line, text) in lines {
            if ports.len() == n {
                return Err(format!("line {line}: more ports than the {n} announced on line {first}"));
            }
            let mut words = text.split_whitespace();
            let text = words.next().unwrap_or_default();
            let mut k = 1;
            for word in words {
                let value = word.strip_prefix("slots=").ok_or_else(|| {
                    format!("line {line}: '{word}' is not understood; a node line is a port, optionally with slots=K")
                })?;
                k = match value.parse::<u32>() {
                    Ok(k) if (1..=MAX_SLOTS).contains(&k) => k,
                    _ => {
                        return Err(format!("line {line}: slots={value}: give a number of slots from 1 to {MAX_SLOTS}"))
                    }
                };
            }
            let port: u32 = text.parse().map_err(|_| format!("line {line}: '{text}' is not a port number"))?;
            if !(1..=65535).contains(&port) {
                return Err(format!("line {line}: port {port} is out of range (1-65535)"));
            }
            let port = port as u16;
            if let Some(i) = ports.iter().position(|&p| p == port) {
                return Err(format!("line {line}: port {port} is a duplicate of line {}", at[i]));
            }
            ports.push(port);
            slots.push(k);
            at.push(line);
        }
        if ports.len() != n {
            return Err(format!("line {first} announces {n} nodes but the file lists {} ports", ports.len()));
        }
        Ok(NodesFile { ports, slots, lines: at })
    }

    /// Slots of every node together (slot uids are handed out in this
    /// order: node i slot s is the `offset(i) + s`th).
    pub fn total_slots(&self) -> usize {
        self.slots.iter().map(|&k| k as usize).sum()
    }

    /// The index of node i's first slot among all slots.
    pub fn slot_offset(&self, i: usize) -> usize {
        self.slots[..i].iter().map(|&k| k as usize).sum()
    }

    /// The line a port was given on.
    pub fn line_of(&self, index: usize) -> usize {
        self.lines[index]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_format_parses() {
        let f = NodesFile::parse("4\n9001\n9002\n9003\n9004\n").unwrap();
        assert_eq!(f.ports, vec![9001, 9002, 9003, 9004]);
        assert_eq!(f.line_of(2), 4);
        assert_eq!(f.slots, vec![1; 4]);
    }

    #[test]
    fn a_node_line_may_give_slots() {
        let f = NodesFile::parse("3\n9001 slots=2\n9002\n9003   slots=4\n").unwrap();
        assert_eq!(f.ports, vec![9001, 9002, 9003]);
        assert_eq!(f.slots, vec![2, 1, 4]);
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
    fn errors_name_the_line() {
        let cases = [
            ("3\n9001\n9002\n", "announces 3 nodes but the file lists 2"),
            ("2\n9001\nabc\n", "line 3: 'abc' is not a port"),
            ("2\n9001\n9001\n", "line 3: port 9001 is a duplicate of line 2"),
            ("1\n70000\n", "line 2: port 70000 is out of range"),
            ("x\n", "line 1: 'x' is not a node count"),
            ("1\n9001\n9002\n", "line 3: more ports"),
            ("", "empty"),
        ];
        for (text, want) in cases {
            let err = NodesFile::parse(text).unwrap_err();
            assert!(err.contains(want), "{err:?} should contain {want:?}");
        }
    }
}
