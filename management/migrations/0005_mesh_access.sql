-- NetBird-only (private) services (issue #9): which user a mesh peer belongs to and which groups
-- peers and users are in, so that a request arriving over the mesh can be let in by group.
-- Group lists are JSON arrays of account_groups ids; NULL means none.
ALTER TABLE mesh_peers ADD COLUMN user_id TEXT;
ALTER TABLE mesh_peers ADD COLUMN peer_groups TEXT;
ALTER TABLE users ADD COLUMN auto_groups TEXT;
CREATE INDEX mesh_peers_user ON mesh_peers (user_id);
-- Where mesh peers reach a private service, as its proxy reported it (JSON), for REST.
ALTER TABLE services ADD COLUMN inbound_listener TEXT;
