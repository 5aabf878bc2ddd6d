//! The command line of every subcommand, read by one parser.
//!
//! Each command declares its operands (`FILE`) and the flags it takes; whatever else is on the
//! line is refused before the command runs, with the flag named and the command's usage. A
//! mistyped flag that was silently ignored used to render something else than asked (a
//! `--metrics-prot 9090` gave a pod without probes) and passed CI: refusing it is the point.

/// One flag a command takes: `--name VALUE`.
pub struct Flag {
    pub name: &'static str,
    /// `--host a --host b`; any other flag given twice is refused (which one would win is a
    /// guess the reader of the command line should not have to make).
    pub repeats: bool,
}

pub const fn once(name: &'static str) -> Flag {
    Flag {
        name,
        repeats: false,
    }
}

pub const fn repeated(name: &'static str) -> Flag {
    Flag {
        name,
        repeats: true,
    }
}

/// A subcommand's grammar.
pub struct Command {
    pub name: &'static str,
    /// Required operands in order (`FILE`); they may stand anywhere between the flags.
    pub operands: &'static [&'static str],
    pub flags: &'static [Flag],
    /// The rest of the usage line after the command's name, for messages.
    pub usage: &'static str,
}

/// A command line that does not fit its command's grammar (exit status 2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageError(pub String);

/// What a command line gave: its operands and flag values, in the order given.
#[derive(Debug, Default)]
pub struct Args {
    operands: Vec<String>,
    values: Vec<(&'static str, String)>,
}

impl Command {
    pub fn usage_line(&self) -> String {
        format!("usage: jairouter-render {} {}", self.name, self.usage)
            .trim_end()
            .to_string()
    }

    fn refuse(&self, what: String) -> UsageError {
        UsageError(format!("{}: {what}\n{}", self.name, self.usage_line()))
    }

    /// `args` is what follows the command's name.
    pub fn parse(&self, args: &[String]) -> Result<Args, UsageError> {
        let mut parsed = Args::default();
        let mut it = args.iter();
        while let Some(arg) = it.next() {
            let Some(name) = arg.strip_prefix("--") else {
                if parsed.operands.len() == self.operands.len() {
                    return Err(self.refuse(format!("unexpected argument {arg}")));
                }
                parsed.operands.push(arg.clone());
                continue;
            };
            let flag = self
                .flags
                .iter()
                .find(|f| f.name == name)
                .ok_or_else(|| self.refuse(format!("unknown flag {arg}")))?;
            // A value that is itself a flag means the value was forgotten: `--out --port 1`
            // would otherwise write the bootstrap into a file named `--port`.
            let value = it
                .next()
                .filter(|v| !v.starts_with("--"))
                .ok_or_else(|| self.refuse(format!("--{name} needs a value")))?;
            if !flag.repeats && parsed.values.iter().any(|(n, _)| *n == flag.name) {
                return Err(self.refuse(format!("--{name} is given twice")));
            }
            parsed.values.push((flag.name, value.clone()));
        }
        if let Some(missing) = self.operands.get(parsed.operands.len()) {
            return Err(self.refuse(format!("{missing} is missing")));
        }
        Ok(parsed)
    }
}

impl Args {
    /// The `index`th operand (present: `parse` refuses a line without all of them).
    pub fn operand(&self, index: usize) -> &str {
        self.operands.get(index).map_or("", String::as_str)
    }

    pub fn one(&self, name: &str) -> Option<&str> {
        self.values
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn all(&self, name: &str) -> Vec<&str> {
        self.values
            .iter()
            .filter(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CMD: Command = Command {
        name: "demo",
        operands: &["FILE"],
        flags: &[once("port"), repeated("host")],
        usage: "FILE [--port N] [--host H ...]",
    };

    fn parse(args: &[&str]) -> Result<Args, UsageError> {
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        CMD.parse(&args)
    }

    fn refusal(args: &[&str]) -> String {
        parse(args).unwrap_err().0
    }

    #[test]
    fn takes_what_the_command_declares() {
        let a = parse(&["app.yml", "--port", "1", "--host", "a", "--host", "b"]).unwrap();
        assert_eq!(a.operand(0), "app.yml");
        assert_eq!(a.one("port"), Some("1"));
        assert_eq!(a.all("host"), ["a", "b"]);
        assert_eq!(a.one("host"), Some("a"));
        assert_eq!(a.one("other"), None);
        // The operand may come after the flags.
        let a = parse(&["--port", "1", "app.yml"]).unwrap();
        assert_eq!(a.operand(0), "app.yml");
        // An empty value is a value.
        assert_eq!(parse(&["f", "--port", ""]).unwrap().one("port"), Some(""));
    }

    #[test]
    fn refuses_naming_the_flag_and_the_usage() {
        let usage = "usage: jairouter-render demo FILE [--port N] [--host H ...]";
        let unknown = refusal(&["f", "--bogus", "1"]);
        assert_eq!(unknown, format!("demo: unknown flag --bogus\n{usage}"));
        assert!(refusal(&["f", "--port"]).starts_with("demo: --port needs a value\n"));
        assert!(refusal(&["f", "--port", "--host", "a"]).starts_with("demo: --port needs a value"));
        assert!(refusal(&["f", "--port", "1", "--port", "2"])
            .starts_with("demo: --port is given twice\n"));
        assert!(refusal(&["--port", "1"]).starts_with("demo: FILE is missing\n"));
        assert!(refusal(&["f", "g"]).starts_with("demo: unexpected argument g\n"));
        // `--name=value` is not a form we read: refused, not taken for an operand.
        assert!(refusal(&["f", "--port=1"]).starts_with("demo: unknown flag --port=1\n"));
        assert!(refusal(&["f", "--bogus", "1"]).ends_with(usage));
    }

    #[test]
    fn a_command_without_operands() {
        const HASH: Command = Command {
            name: "hash-key",
            operands: &[],
            flags: &[once("salt")],
            usage: "[--salt BASE64] < KEY",
        };
        let args: Vec<String> = vec!["--salt".into(), "c2FsdA==".into()];
        assert_eq!(HASH.parse(&args).unwrap().one("salt"), Some("c2FsdA=="));
        assert!(HASH.parse(&["x".to_string()]).is_err());
        assert!(HASH.parse(&[]).is_ok());
    }
}
