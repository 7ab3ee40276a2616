//! bk-job's rules for which script version a job runs and which account it runs as.

use fleetrun_inventory::{
    AccountError, Inventory, Scope, ScriptEditError, ScriptError, VersionStatus,
};

const FIXTURE: &str = r#"
[[business]]
bk_biz_id = 2
name = "shop"

[[business]]
bk_biz_id = 3
name = "payments"

[[business_set]]
bk_biz_set_id = 9
name = "online"
members = [2, 3]

[[account]]
id = 1
alias = "root"
account = "root"
scopes = ["biz:2", "biz:3"]

# Listing no scope, it belongs to no business: no job may run as it.
[[account]]
id = 5
alias = "orphan"
account = "nobody"

[[account]]
id = 2
alias = "deploy"
account = "deploy"
scopes = ["biz:2", "biz_set:9"]

# The same alias in another scope is another account.
[[account]]
id = 3
alias = "deploy"
account = "deploy-pay"
scopes = ["biz:3"]

[[account]]
id = 4
alias = "mysql"
account = "dba"
category = "database"

[[script]]
id = "s1"
name = "disk usage"
script_language = 1
scope = "biz:2"

[[script.version]]
id = 1
version = "v1"
content = "df -h"
status = "offline"

[[script.version]]
id = 2
version = "v2"
content = "df -h /"
status = "online"

[[script.version]]
id = 3
version = "v3"
content = "df"
status = "draft"

[[script.version]]
id = 4
version = "v0"
content = "rm -rf /"
status = "disabled"

[[script]]
id = "s2"
name = "never published"
script_language = 4
scope = "biz_set:9"

[[script.version]]
id = 5
version = "v1"
content = "print(1)"
"#;

/// (what is asked, scope, id, name, the answer).
type Case<'a> = (&'a str, Scope, Option<i64>, Option<&'a str>, &'a str);

fn fixture() -> Inventory {
    Inventory::from_toml(FIXTURE).unwrap()
}

/// `version <id>`, or `code message`.
fn run(inventory: &Inventory, scope: Scope, version: Option<i64>, script: Option<&str>) -> String {
    match inventory.runnable_version(&scope, version, script) {
        Ok(v) => format!("version {}", v.id),
        Err(e) => format!("{} {e}", e.code()),
    }
}

#[test]
fn runnable_version_rules() {
    let inventory = fixture();
    let biz2 = Scope::Biz(2);
    #[rustfmt::skip]
    let cases: &[Case] = &[
        ("a script runs its online version", biz2, None, Some("s1"), "version 2"),
        ("an online version", biz2, Some(2), None, "version 2"),
        ("an offline version still runs", biz2, Some(1), None, "version 1"),
        ("the version id wins over the script id", biz2, Some(1), Some("s2"), "version 1"),
        ("a draft", biz2, Some(3), None, "1244018 script version 3 is neither online nor offline"),
        ("a disabled version", biz2, Some(4), None, "1244018 script version 4 is neither online nor offline"),
        ("a script with no online version", Scope::BizSet(9), None, Some("s2"), "1244018 script \"s2\" has no online version"),
        ("an unknown version", biz2, Some(99), None, "1243001 script version 99 not found"),
        ("an unknown script", biz2, None, Some("nope"), "1243001 script \"nope\" not found"),
        ("a version of another scope", Scope::Biz(3), Some(2), None, "1243001 script version 2 not found"),
        ("a script of another scope", Scope::BizSet(9), None, Some("s1"), "1243001 script \"s1\" not found"),
        ("a member business does not see its set's scripts", biz2, Some(5), None, "1243001 script version 5 not found"),
        ("nothing named", biz2, None, None, "1241004 no script_version_id or script_id"),
    ];
    for (case, scope, version, script, expected) in cases {
        assert_eq!(
            run(&inventory, *scope, *version, *script),
            *expected,
            "{case}"
        );
    }
}

#[test]
fn publishing_and_disabling() {
    let mut inventory = fixture();
    let biz2 = Scope::Biz(2);

    let script = inventory.create_script("s3", "uptime", 1, biz2).unwrap();
    assert!(script.versions.is_empty());
    let v1 = inventory
        .create_version("s3", "v1", b"uptime".to_vec(), 10)
        .unwrap();
    assert_eq!((v1.id, v1.status), (6, VersionStatus::Draft));
    assert_eq!(
        run(&inventory, biz2, None, Some("s3")),
        "1244018 script \"s3\" has no online version"
    );
    assert_eq!(
        run(&inventory, biz2, Some(6), None),
        "1244018 script version 6 is neither online nor offline"
    );

    inventory.publish(6).unwrap();
    assert_eq!(run(&inventory, biz2, None, Some("s3")), "version 6");
    let v2 = inventory
        .create_version("s3", "v2", b"uptime -p".to_vec(), 20)
        .unwrap()
        .id;
    inventory.publish(v2).unwrap();
    assert_eq!(
        run(&inventory, biz2, None, Some("s3")),
        format!("version {v2}")
    );
    assert_eq!(
        inventory.scripts().version(6).unwrap().status,
        VersionStatus::Offline
    );
    assert_eq!(run(&inventory, biz2, Some(6), None), "version 6");

    // Re-publishing an offline version takes it back online; still one online version.
    inventory.publish(6).unwrap();
    let script = inventory.scripts().script("s3").unwrap();
    let online: Vec<i64> = script
        .versions
        .iter()
        .filter(|v| v.status == VersionStatus::Online)
        .map(|v| v.id)
        .collect();
    assert_eq!(online, [6]);

    inventory.disable(6).unwrap();
    assert_eq!(
        run(&inventory, biz2, None, Some("s3")),
        "1244018 script \"s3\" has no online version"
    );
    assert_eq!(
        run(&inventory, biz2, Some(6), None),
        "1244018 script version 6 is neither online nor offline"
    );
    assert_eq!(inventory.publish(6), Err(ScriptEditError::Disabled(6)));
}

#[test]
fn refused_script_edits() {
    let mut inventory = fixture();
    assert_eq!(
        inventory.create_script("s1", "x", 1, Scope::Biz(2)).err(),
        Some(ScriptEditError::DuplicateScript("s1".into()))
    );
    assert_eq!(
        inventory.create_script("s9", "x", 1, Scope::Biz(5)).err(),
        Some(ScriptEditError::UnknownScope(Scope::Biz(5)))
    );
    assert_eq!(
        inventory.create_script("s9", "x", 0, Scope::Biz(2)).err(),
        Some(ScriptEditError::BadLanguage(0))
    );
    assert_eq!(
        inventory.create_version("s9", "v1", Vec::new(), 0).err(),
        Some(ScriptEditError::UnknownScript("s9".into()))
    );
    assert_eq!(
        inventory.publish(99),
        Err(ScriptEditError::UnknownVersion(99))
    );
    assert_eq!(
        inventory.disable(99),
        Err(ScriptEditError::UnknownVersion(99))
    );
}

#[test]
fn script_edits_survive_agent_merges() {
    let mut inventory = fixture();
    inventory
        .create_script("s3", "x", 1, Scope::Biz(3))
        .unwrap();
    let merged = inventory.with_agents(&[]);
    assert!(merged.inventory.scripts().script("s3").is_some());
}

fn account(inventory: &Inventory, scope: Scope, id: Option<i64>, alias: Option<&str>) -> String {
    match inventory.account_for(&scope, id, alias) {
        Ok(account) => format!("account {} ({})", account.id, account.account),
        Err(e) => format!("{} {e}", e.code()),
    }
}

#[test]
fn account_rules() {
    let inventory = fixture();
    #[rustfmt::skip]
    let cases: &[Case] = &[
        ("an account of several businesses", Scope::Biz(3), Some(1), None, "account 1 (root)"),
        ("an account listing no scope", Scope::Biz(2), Some(5), None, "1244004 account 5 is not allowed in biz:2"),
        ("not lent to a set's members", Scope::BizSet(9), Some(1), None, "1244004 account 1 is not allowed in biz_set:9"),
        ("by alias", Scope::Biz(2), None, Some("root"), "account 1 (root)"),
        ("an alias means the account of the scope", Scope::Biz(2), None, Some("deploy"), "account 2 (deploy)"),
        ("the same alias elsewhere", Scope::Biz(3), None, Some("deploy"), "account 3 (deploy-pay)"),
        ("scopes match exactly", Scope::BizSet(9), None, Some("deploy"), "account 2 (deploy)"),
        ("the id wins over the alias", Scope::Biz(2), Some(1), Some("deploy"), "account 1 (root)"),
        ("an id not allowed in the scope", Scope::Biz(3), Some(2), None, "1244004 account 2 is not allowed in biz:3"),
        ("an alias not allowed in the scope", Scope::BizSet(8), None, Some("deploy"), "1244004 account \"deploy\" is not allowed in biz_set:8"),
        ("an unknown id", Scope::Biz(2), Some(99), None, "1244003 account 99 does not exist"),
        ("an unknown alias", Scope::Biz(2), None, Some("nobody"), "1244003 account \"nobody\" does not exist"),
        ("a database account does not run scripts", Scope::Biz(2), Some(4), None, "1244003 account 4 does not exist"),
        ("nothing named", Scope::Biz(2), None, None, "1241004 no account_id or account_alias"),
    ];
    for (case, scope, id, alias, expected) in cases {
        assert_eq!(
            account(&inventory, *scope, *id, *alias),
            *expected,
            "{case}"
        );
    }
    assert!(matches!(
        inventory.account_for(&Scope::Biz(3), Some(2), None),
        Err(AccountError::NotAllowed { .. })
    ));
}

#[test]
fn error_codes() {
    assert_eq!(ScriptError::NotFound("x".into()).code(), 1243001);
    assert_eq!(ScriptError::NotRunnable(1).code(), 1244018);
    assert_eq!(AccountError::Unknown("x".into()).code(), 1244003);
}
