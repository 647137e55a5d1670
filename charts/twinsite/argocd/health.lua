-- Argo CD resource health for twinsite's ReplicatedVM, FailoverPlan and Site (twinsite.io).
-- One script for the three kinds: set it as resource.customizations.health.twinsite.io_ReplicatedVM,
-- ..._FailoverPlan and ..._Site in argocd-cm (docs/gitops.md). It reads the kstatus conditions
-- the controller writes and agrees with kstatus: Healthy exactly when kstatus says Current,
-- Degraded whenever it says Failed, Progressing or Suspended otherwise.
local hs = {}

local function condition(t)
  if obj.status == nil or obj.status.conditions == nil then
    return nil
  end
  for _, c in ipairs(obj.status.conditions) do
    if c.type == t then
      return c
    end
  end
  return nil
end

local function is_true(t)
  local c = condition(t)
  return c ~= nil and c.status == "True"
end

local function message(c, fallback)
  if c ~= nil and c.message ~= nil and c.message ~= "" then
    return c.message
  end
  return fallback
end

if obj.status == nil then
  hs.status = "Progressing"
  hs.message = "waiting for the twinsite controller to write status"
  return hs
end

-- kstatus: a status written for an older spec says nothing about the current one.
local generation = obj.metadata.generation
local observed = obj.status.observedGeneration
if generation ~= nil and (observed == nil or observed < generation) then
  hs.status = "Progressing"
  hs.message = "waiting for the controller to observe generation " .. tostring(generation)
  return hs
end

-- Needs a person: a failed job, a conflict, a VM off at its active site, settings the site
-- does not run.
if is_true("Stalled") then
  hs.status = "Degraded"
  hs.message = message(condition("Stalled"), "stalled")
  return hs
end

-- Waits for a person on purpose: a manual commit, a manual approval.
if obj.kind == "ReplicatedVM" and is_true("CommitPending") then
  hs.status = "Suspended"
  hs.message = message(condition("CommitPending"), "waiting for the commit annotation")
  return hs
end
if obj.kind == "FailoverPlan" and is_true("WaitingForApproval") then
  hs.status = "Suspended"
  hs.message = message(condition("WaitingForApproval"), "waiting for an approval")
  return hs
end

local ready = condition("Ready")
if ready ~= nil and ready.status == "True" then
  hs.status = "Healthy"
  hs.message = message(ready, "ready")
  if obj.kind == "ReplicatedVM" and obj.status.replication ~= nil then
    local r = obj.status.replication
    if r.health ~= nil and r.health ~= "Healthy" then
      -- RPO over 2x (Warning) or 3x (Critical) the interval: the alerts page on it
      -- (TwinsiteRPOWarning, TwinsiteRPOCritical); the VM itself is where the spec wants it.
      hs.message = hs.message .. "; replication health " .. r.health
      if r.rpoSeconds ~= nil then
        hs.message = hs.message .. " (RPO " .. tostring(r.rpoSeconds) .. "s)"
      end
    end
  end
  return hs
end

if is_true("Reconciling") then
  hs.status = "Progressing"
  hs.message = message(condition("Reconciling"), "reconciling")
  return hs
end

-- A Site has Ready only: False means the controller cannot use it (Unreachable,
-- Unauthorized, CAUnavailable, SecretNamespace).
if obj.kind == "Site" and ready ~= nil and ready.status == "False" then
  hs.status = "Degraded"
  hs.message = (ready.reason or "NotReady") .. ": " .. message(ready, "site not ready")
  return hs
end

hs.status = "Progressing"
hs.message = message(ready, "waiting for the controller to report Ready")
return hs
