//! bk-job's rules for which account a job runs as.

use fleetrun_inventory::{AccountError, Inventory, Scope};

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
"#;

/// (what is asked, scope, id, name, the answer).
type Case<'a> = (&'a str, Scope, Option<i64>, Option<&'a str>, &'a str);

fn fixture() -> Inventory {
    Inventory::from_toml(FIXTURE).unwrap()
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
fn account_error_codes() {
    assert_eq!(AccountError::Unknown("x".into()).code(), 1244003);
}
