//! `ferry-dump`: inspect a Ferry state stream (a `migrate file:` snapshot or a
//! `--dump-stream` capture).

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use devstate::MachineSchema;
use std::path::PathBuf;
use std::process::ExitCode;
use tools::{compat, dump};

#[derive(Debug, Parser)]
#[command(
    name = "ferry-dump",
    version,
    about = "Inspect Ferry state streams and schemas"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Print the header, every section field by field, and a RAM summary; exit 1 when the
    /// stream is damaged (CRC, framing or order problems).
    Show {
        /// Stream file.
        file: PathBuf,
        /// Only sections with this name.
        #[arg(long)]
        section: Option<String>,
        /// Print JSON instead of a tree.
        #[arg(long)]
        json: bool,
        /// Also list every RAM record (offset, pages, kind, data CRC).
        #[arg(long)]
        ram: bool,
        /// Decode with this schema JSON instead of the committed one.
        #[arg(long)]
        schema: Option<PathBuf>,
    },
    /// Check every CRC and structural rule; print the first problem (section, byte offset)
    /// and exit 1.
    Verify {
        /// Stream file.
        file: PathBuf,
        /// List every problem, not just the first.
        #[arg(long)]
        all: bool,
        /// Decode with this schema JSON instead of the committed one.
        #[arg(long)]
        schema: Option<PathBuf>,
    },
    /// Section-by-section, field-by-field differences, volatile fields apart; exit 1 when
    /// anything but volatile fields differs.
    Diff {
        /// First stream.
        a: PathBuf,
        /// Second stream.
        b: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print the schema this build emits for a machine type.
    Schema {
        /// Machine type (`help` lists them).
        #[arg(long, default_value = "ferry")]
        machine: String,
    },
    /// Report every change from OLD to NEW that breaks migration; exit 1 on a break.
    CheckCompat {
        /// Frozen schema JSON.
        old: PathBuf,
        /// Schema JSON to check.
        new: PathBuf,
    },
}

fn read_schema(p: &PathBuf) -> Result<MachineSchema> {
    let text =
        std::fs::read_to_string(p).with_context(|| format!("Cannot read {}", p.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not a Ferry schema", p.display()))
}

fn read(p: &PathBuf) -> Result<Vec<u8>> {
    std::fs::read(p).with_context(|| format!("Cannot read {}", p.display()))
}

fn decode(p: &PathBuf, schema: Option<MachineSchema>, ram: bool) -> Result<dump::StreamView> {
    dump::decode(&read(p)?, schema, ram)
        .with_context(|| format!("Cannot read {} as a Ferry state stream", p.display()))
}

fn run(cli: Cli) -> Result<bool> {
    match cli.command {
        Cmd::Show {
            file,
            section,
            json,
            ram,
            schema,
        } => {
            let schema = schema.as_ref().map(read_schema).transpose()?;
            let mut v = decode(&file, schema, ram)?;
            if let Some(f) = &section
                && !v.sections.iter().any(|s| &s.name == f)
            {
                let names: std::collections::BTreeSet<_> =
                    v.sections.iter().map(|s| s.name.as_str()).collect();
                bail!(
                    "No section '{f}' in {} (it has: {})",
                    file.display(),
                    names.into_iter().collect::<Vec<_>>().join(", ")
                );
            }
            if json {
                if let Some(f) = &section {
                    v.sections.retain(|s| &s.name == f);
                }
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print!("{}", dump::render(&v, section.as_deref()));
            }
            Ok(v.problems.is_empty())
        }
        Cmd::Verify { file, all, schema } => {
            let schema = schema.as_ref().map(read_schema).transpose()?;
            let problems = dump::verify(&read(&file)?, schema).with_context(|| {
                format!("Cannot read {} as a Ferry state stream", file.display())
            })?;
            if problems.is_empty() {
                println!("{}: ok", file.display());
                return Ok(true);
            }
            let shown = if all { problems.len() } else { 1 };
            for p in &problems[..shown] {
                println!("{}: {}", file.display(), p.message);
            }
            if all {
                println!("{}: {} problem(s)", file.display(), problems.len());
            }
            Ok(false)
        }
        Cmd::Diff { a, b, json } => {
            let va = decode(&a, None, false)?;
            let vb = decode(&b, None, false)?;
            let d = dump::diff(&va, &vb);
            if json {
                println!("{}", serde_json::to_string_pretty(&d)?);
            } else {
                for l in &d.differences {
                    println!("differs: {l}");
                }
                for l in &d.volatile {
                    println!("volatile: {l}");
                }
                println!(
                    "{} difference(s), {} volatile difference(s) (volatile fields are expected to differ)",
                    d.differences.len(),
                    d.volatile.len()
                );
            }
            Ok(d.differences.is_empty())
        }
        Cmd::Schema { machine } => {
            if machine == "help" {
                print!("{}", machine_types::help_text());
                return Ok(true);
            }
            let m = machine_types::MachineType::lookup(&machine)?;
            print!("{}", tools::current_schema(m).to_json());
            Ok(true)
        }
        Cmd::CheckCompat { old, new } => {
            let (o, n) = (read_schema(&old)?, read_schema(&new)?);
            let findings = compat::check(&o, &n);
            let breaks = findings.iter().filter(|f| f.breaks).count();
            for f in &findings {
                println!("{}: {}", if f.breaks { "BREAK" } else { "note" }, f.what);
            }
            println!(
                "{}: {} breaking change(s), {} note(s){}",
                o.machine,
                breaks,
                findings.len() - breaks,
                if breaks > 0 {
                    " - migration to or from builds with the old schema would fail"
                } else {
                    ""
                }
            );
            Ok(breaks == 0)
        }
    }
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            // --help and --version print and succeed; usage errors exit 2 (clap's own message).
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    match run(cli) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("ferry-dump: {e:#}");
            ExitCode::from(2)
        }
    }
}
