-- When a host began claiming its current address: of two hosts claiming one address in a cloud
-- area, the earlier claim holds it and the later one is quarantined. Hosts registered before this
-- column existed count as claiming since the beginning (ties go to the lower host id).
ALTER TABLE host ADD COLUMN address_since INTEGER NOT NULL DEFAULT 0;

-- Agents an operator revoked: refused at every connection until unrevoked, whatever certificate
-- they present for that identity.
CREATE TABLE agent_revocation (
    agent_id   TEXT    PRIMARY KEY,
    reason     TEXT    NOT NULL,
    operator   TEXT    NOT NULL,
    revoked_at INTEGER NOT NULL
);
