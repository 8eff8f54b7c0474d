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
    /// Print the header, every section field by field, and a RAM summary.
    Show {
        /// Stream file.
        file: PathBuf,
        /// Only sections with this name.
        #[arg(long)]
        section: Option<String>,
        /// Print JSON instead of a tree.
        #[arg(long)]
        json: bool,
        /// List every RAM record.
        #[arg(long)]
        ram: bool,
        /// Decode with this schema JSON instead of the committed one.
        #[arg(long)]
        schema: Option<PathBuf>,
    },
    /// Check every CRC and structural rule; exit 1 on a problem.
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
    /// Section-by-section, field-by-field differences; exit 1 when they differ.
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
    serde_json::from_str(&text).with_context(|| format!("{} is not a schema", p.display()))
}

fn read(p: &PathBuf) -> Result<Vec<u8>> {
    std::fs::read(p).with_context(|| format!("Cannot read {}", p.display()))
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
            let v = dump::decode(&read(&file)?, schema, ram)
                .with_context(|| format!("Cannot decode {}", file.display()))?;
            if json {
                let mut j = serde_json::to_value(&v)?;
                if let Some(f) = section {
                    j["sections"] = serde_json::Value::Array(
                        v.sections
                            .iter()
                            .filter(|s| s.name == f)
                            .map(|s| serde_json::to_value(s).unwrap_or_default())
                            .collect(),
                    );
                }
                println!("{}", serde_json::to_string_pretty(&j)?);
            } else {
                print!("{}", dump::render(&v, section.as_deref()));
            }
            Ok(true)
        }
        Cmd::Verify { file, all, schema } => {
            let schema = schema.as_ref().map(read_schema).transpose()?;
            let problems = dump::verify(&read(&file)?, schema, all);
            if problems.is_empty() {
                println!("{}: ok", file.display());
                return Ok(true);
            }
            for p in &problems {
                println!("{}: {p}", file.display());
            }
            Ok(false)
        }
        Cmd::Diff { a, b, json } => {
            let va = dump::decode(&read(&a)?, None, false)
                .with_context(|| format!("Cannot decode {}", a.display()))?;
            let vb = dump::decode(&read(&b)?, None, false)
                .with_context(|| format!("Cannot decode {}", b.display()))?;
            let schema = tools::committed_schema(&va.machine);
            let d = dump::diff(&va, &vb, schema.as_ref());
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
                    "{} differences, {} volatile differences",
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
                "{}: {} breaking change(s), {} note(s)",
                o.machine,
                breaks,
                findings.len() - breaks
            );
            if breaks > 0 {
                bail!("{} would not migrate to or from this build", o.machine);
            }
            Ok(true)
        }
    }
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("ferry-dump: {e:#}");
            ExitCode::from(2)
        }
    }
}
