//! The module layering, checked on the crate's source: data flows one way (sources ->
//! state -> health -> reconcile -> maps), with the agent and its API on top. Each rule
//! names modules that a module must not name through `crate::` paths.
use std::{collections::BTreeSet, fs, path::Path};

use proc_macro2::{TokenStream, TokenTree};
use syn::visit::Visit;

/// Everything below the desired state: what consumes it, and the agent on top.
const BELOW_STATE: &[&str] = &[
    "health",
    "reconcile",
    "datapath",
    "loader",
    "flowtables",
    "status",
    "metrics",
    "api",
    "agent",
];

/// (module, one it must not name, why).
fn rules() -> Vec<(&'static str, &'static str, &'static str)> {
    let mut rules = vec![(
        "state",
        "discovery",
        "desired state holds data only; discovery turns containers and tasks into backends",
    )];
    for below in BELOW_STATE {
        rules.push(("state", below, "the desired state knows nothing downstream"));
        rules.push(("discovery", below, "sources only feed the desired state"));
    }
    rules
}

/// Modules other than these must not name the agent or its API: they sit on top.
const TOP: &[&str] = &["agent", "api", "main"];

/// Known exceptions to the top rule, to drop once gone.
const PENDING: &[(&str, &str)] = &[];

/// The top-level modules the `crate::` paths of `source` name.
fn named_modules(source: &str) -> BTreeSet<String> {
    let file = syn::parse_file(source).expect("the crate's source parses");
    let mut names = Names::default();
    names.visit_file(&file);
    names.0
}

#[derive(Default)]
struct Names(BTreeSet<String>);

impl Names {
    fn use_tree(&mut self, tree: &syn::UseTree) {
        match tree {
            syn::UseTree::Path(p) => {
                self.0.insert(p.ident.to_string());
            }
            syn::UseTree::Name(n) => {
                self.0.insert(n.ident.to_string());
            }
            syn::UseTree::Rename(r) => {
                self.0.insert(r.ident.to_string());
            }
            syn::UseTree::Group(g) => g.items.iter().for_each(|t| self.use_tree(t)),
            syn::UseTree::Glob(_) => {}
        }
    }

    /// `crate :: name` inside a macro's tokens (not parsed as paths).
    fn tokens(&mut self, tokens: TokenStream) {
        let tokens: Vec<TokenTree> = tokens.into_iter().collect();
        for (i, token) in tokens.iter().enumerate() {
            match (
                token,
                tokens.get(i + 1),
                tokens.get(i + 2),
                tokens.get(i + 3),
            ) {
                (TokenTree::Group(g), ..) => self.tokens(g.stream()),
                (
                    TokenTree::Ident(krate),
                    Some(TokenTree::Punct(a)),
                    Some(TokenTree::Punct(b)),
                    Some(TokenTree::Ident(name)),
                ) if krate == "crate" && a.as_char() == ':' && b.as_char() == ':' => {
                    self.0.insert(name.to_string());
                }
                _ => {}
            }
        }
    }
}

impl<'ast> Visit<'ast> for Names {
    fn visit_item_use(&mut self, item: &'ast syn::ItemUse) {
        if let syn::UseTree::Path(p) = &item.tree
            && p.ident == "crate"
        {
            self.use_tree(&p.tree);
        }
    }

    fn visit_path(&mut self, path: &'ast syn::Path) {
        let mut segments = path.segments.iter();
        if let (Some(first), Some(second)) = (segments.next(), segments.next())
            && first.ident == "crate"
        {
            self.0.insert(second.ident.to_string());
        }
        syn::visit::visit_path(self, path);
    }

    fn visit_macro(&mut self, mac: &'ast syn::Macro) {
        self.tokens(mac.tokens.clone());
        syn::visit::visit_macro(self, mac);
    }
}

/// (module, file, modules it names) for every source file; `state.rs` and `state/*.rs`
/// are both module `state`.
fn crate_modules() -> Vec<(String, String, BTreeSet<String>)> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut out = Vec::new();
    let mut dirs = vec![src.clone()];
    while let Some(dir) = dirs.pop() {
        for entry in fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let rel = path.strip_prefix(&src).unwrap();
            let first = rel.components().next().unwrap().as_os_str();
            let module = first.to_string_lossy().trim_end_matches(".rs").to_string();
            let names = named_modules(&fs::read_to_string(&path).unwrap());
            out.push((module, rel.display().to_string(), names));
        }
    }
    out
}

#[test]
fn the_checker_sees_nested_uses_paths_and_macros() {
    let names = named_modules(
        r#"
        use crate::{config::Config, discovery::{labels, swarm::SwarmTask}};
        use crate::state as s;
        fn f() { crate::api::send(); format!("{}", crate::agent::ifindex("x")); }
        "#,
    );
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    assert_eq!(names, ["agent", "api", "config", "discovery", "state"]);
}

#[test]
fn modules_name_only_what_their_layer_allows() {
    let modules = crate_modules();
    assert!(
        modules.iter().any(|(m, _, _)| m == "state")
            && modules.iter().any(|(m, _, _)| m == "discovery"),
        "the source was found"
    );
    let mut broken = Vec::new();
    for (module, file, names) in &modules {
        for (ruled, banned, why) in rules() {
            if module == ruled && names.contains(banned) {
                broken.push(format!("{file} uses crate::{banned}: {why}"));
            }
        }
        if TOP.contains(&module.as_str()) {
            continue;
        }
        for top in ["agent", "api"] {
            if names.contains(top) && !PENDING.contains(&(module.as_str(), top)) {
                broken.push(format!(
                    "{file} uses crate::{top}: only the binary and the agent sit above the API"
                ));
            }
        }
    }
    assert!(broken.is_empty(), "{}", broken.join("\n"));
}
