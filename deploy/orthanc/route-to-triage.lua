-- msk-triage auto-routing for Orthanc (tested with Orthanc 1.10.1).
--
-- When a study becomes stable (no new instance for "StableAge" seconds), send its radiographs
-- to the msk-triage node, the way a PACS routing rule would. Settings come from the "MskTriage"
-- section of the Orthanc configuration (see README.md in this folder).
--
-- Loops are avoided three ways, because msk-triage stores its results (an SR series and one
-- secondary-capture series) into the same study, which makes the study stable once more:
--   1. only series whose Modality is a radiograph (CR, DX by default) are considered, so the
--      SR series (Modality SR) and anything else (CT, PR, KO ...) never go out;
--   2. series whose Manufacturer is msk-triage's own are skipped, whatever their modality;
--   3. each instance sent is marked with user metadata after msk-triage acknowledged it, and
--      marked instances are never sent again. The stable event that our results cause therefore
--      sends nothing, and a late burst of images sends only the new ones (msk-triage scores the
--      study again as a new revision).
--
-- An instance msk-triage refuses (a DX without pixel data, a corrupt file: see its log) does not
-- hold up the rest: when a study's send fails while msk-triage answers a C-ECHO, its instances
-- are sent one by one, those acknowledged are marked, and those refused are counted in user
-- metadata and sent again at the study's next stable event, at most "MaxAttempts" times.
--
-- Priors retrieved from an archive are not new acquisitions: instances that came from a calling
-- AE title listed in "SkipCallingAETs" (the archive's) are never sent.
--
-- A send that fails (msk-triage down or restarting) is not lost: the study is queued and sent
-- again at a later stable event of any study (at once after a send that worked, otherwise at
-- most every "RetryAfterSeconds"). Orthanc keeps the studies that wait for their stable age in
-- memory only, so a restart drops their stable event; at start-up the rule therefore goes over
-- the studies of the last "RecoverChanges" changes and sends what was never acknowledged. The
-- queue itself lives in memory too: that start-up pass also covers the failed sends it held.

local settings = GetOrthancConfiguration()['MskTriage'] or {}
local TARGET = settings['Modality'] or 'triage'
local OWN_MANUFACTURER = settings['OwnManufacturer'] or 'msk-triage'
local ROUTED = settings['RoutedMetadata'] or 'MskTriageRouted'
local REFUSED = settings['RefusedMetadata'] or 'MskTriageRefused'
local RETRY_AFTER = settings['RetryAfterSeconds'] or 60
local MAX_ATTEMPTS = settings['MaxAttempts'] or 10
local RECOVER_CHANGES = settings['RecoverChanges'] or 10000
local RECOVER_HOURS = settings['RecoverHours'] or 24
local ROUTE_MODALITIES = {}
for _, modality in ipairs(settings['RouteModalities'] or { 'CR', 'DX' }) do
  ROUTE_MODALITIES[string.upper(modality)] = true
end
local SKIP_CALLING_AETS = {}
for _, aet in ipairs(settings['SkipCallingAETs'] or {}) do
  SKIP_CALLING_AETS[aet] = true
end

local function log(message)
  print('msk-triage routing: ' .. message)
end

-- Why a series is not routed, or nil when it is.
local function skipReason(series)
  local tags = series['MainDicomTags'] or {}
  local modality = string.upper(tags['Modality'] or '')
  if (tags['Manufacturer'] or '') == OWN_MANUFACTURER then
    return 'output of ' .. OWN_MANUFACTURER
  end
  if not ROUTE_MODALITIES[modality] then
    return 'modality "' .. modality .. '" is not routed'
  end
  return nil
end

-- Why an instance is not sent (nil: it is), and how often msk-triage refused it so far.
local function instanceSkipReason(instanceId)
  local path = '/instances/' .. instanceId .. '/metadata'
  local refusals = 0
  for _, name in ipairs(ParseJson(RestApiGet(path)) or {}) do
    if name == ROUTED then
      return 'acknowledged before', 0
    elseif name == REFUSED then
      refusals = tonumber(RestApiGet(path .. '/' .. REFUSED)) or 0
      if refusals >= MAX_ATTEMPTS then
        return 'refused ' .. refusals .. ' times', refusals
      end
    elseif name == 'RemoteAET' and SKIP_CALLING_AETS[RestApiGet(path .. '/RemoteAET')] then
      return 'from a calling AE title in SkipCallingAETs', 0
    end
  end
  return nil, refusals
end

-- Send *instances* in one synchronous store; true when msk-triage acknowledged every one.
local function send(instances)
  local body = DumpJson({ Resources = instances, Synchronous = true }, true)
  return RestApiPost('/modalities/' .. TARGET .. '/store', body) ~= nil
end

local function mark(instances, name, values)
  local stamp = os.date('!%Y%m%dT%H%M%SZ')
  for _, instanceId in ipairs(instances) do
    RestApiPut('/instances/' .. instanceId .. '/metadata/' .. name, values[instanceId] or stamp)
  end
end

-- Modified or anonymized copies are derived data, not what a modality acquired.
local function isDerived(studyId)
  for _, name in ipairs(ParseJson(RestApiGet('/studies/' .. studyId .. '/metadata')) or {}) do
    if name == 'ModifiedFrom' or name == 'AnonymizedFrom' then
      return true
    end
  end
  return false
end

-- Send the study's radiographs that msk-triage has not acknowledged yet, and mark them.
-- Returns 'sent', 'nothing' (nothing left to send, or the study is gone) or 'failed'.
-- *quiet*: do not log a study that has nothing to send.
local function routeStudy(studyId, quiet)
  local seriesList = RestApiGet('/studies/' .. studyId .. '/series')
  if seriesList == nil then
    return 'nothing' -- deleted meanwhile
  end
  if isDerived(studyId) then
    return 'nothing'
  end
  local pending = {}
  local refusedBefore = {}
  local skipped = 0
  for _, series in ipairs(ParseJson(seriesList)) do
    local reason = skipReason(series)
    if reason ~= nil then
      skipped = skipped + #series['Instances']
    else
      for _, instanceId in ipairs(series['Instances']) do
        local reason, refusals = instanceSkipReason(instanceId)
        if reason ~= nil then
          skipped = skipped + 1
        else
          table.insert(pending, instanceId)
          refusedBefore[instanceId] = refusals
        end
      end
    end
  end
  if #pending == 0 then
    if quiet then
      return 'nothing'
    end
    log('study ' .. studyId .. ': nothing to send (' .. skipped .. ' instances skipped)')
    return 'nothing'
  end
  -- Synchronous, so that the instances are marked only once msk-triage acknowledged them.
  if send(pending) then
    mark(pending, ROUTED, {})
    log('study ' .. studyId .. ': sent ' .. #pending .. ' instances to ' .. TARGET
      .. ' (' .. skipped .. ' skipped)')
    return 'sent'
  end
  if RestApiPost('/modalities/' .. TARGET .. '/echo', '') == nil then
    -- Not marked: the study is queued (below) and sent again later.
    log('study ' .. studyId .. ': sending ' .. #pending .. ' instances to ' .. TARGET .. ' FAILED')
    return 'failed'
  end
  -- msk-triage is up and refused something: one by one, to send all it takes.
  local sent, refused, counts = {}, {}, {}
  for _, instanceId in ipairs(pending) do
    if send({ instanceId }) then
      table.insert(sent, instanceId)
    else
      table.insert(refused, instanceId)
      counts[instanceId] = tostring(refusedBefore[instanceId] + 1)
    end
  end
  mark(sent, ROUTED, {})
  mark(refused, REFUSED, counts)
  log('study ' .. studyId .. ': sent ' .. #sent .. ' instances to ' .. TARGET .. ', ' .. #refused
    .. ' REFUSED (' .. table.concat(refused, ', ') .. '; see msk-triage\'s log), '
    .. skipped .. ' skipped')
  if #sent == 0 then
    return 'failed' -- queued like a study msk-triage could not take, MaxAttempts at most
  end
  return 'sent'
end

-- Studies whose send failed, oldest first, and how often each failed.
local queue = {}
local attempts = {}
local lastRound = 0

local function enqueue(studyId)
  if attempts[studyId] == nil then
    attempts[studyId] = 0
    table.insert(queue, studyId)
  end
end

-- Send the queued studies, oldest first. The round stops at the first failure (msk-triage is
-- probably still down: each further try could wait out the modality's Timeout); the study that
-- failed goes to the end, so that one msk-triage keeps refusing cannot hold up the others, and
-- it is given up after MaxAttempts failures.
local function retryQueued()
  lastRound = os.time()
  while #queue > 0 do
    local studyId = table.remove(queue, 1)
    if routeStudy(studyId) == 'failed' then
      attempts[studyId] = attempts[studyId] + 1
      if attempts[studyId] >= MAX_ATTEMPTS then
        attempts[studyId] = nil
        log('study ' .. studyId .. ': GAVE UP after ' .. MAX_ATTEMPTS .. ' failed sends; send it'
          .. ' by hand (POST /modalities/' .. TARGET .. '/store)')
      else
        table.insert(queue, studyId)
      end
      return
    end
    attempts[studyId] = nil
  end
end

function OnStableStudy(studyId, tags, metadata)
  local outcome = routeStudy(studyId)
  if outcome == 'failed' then
    enqueue(studyId)
  elseif outcome == 'sent' or os.time() - lastRound >= RETRY_AFTER then
    -- A send that just worked says msk-triage is back: no reason to wait.
    retryQueued()
  end
end

-- Orthanc 1.11.1 and later call this every "LuaHeartBeatPeriod" seconds (older ones ignore
-- it): queued studies are retried without waiting for another study's stable event.
function OnHeartBeat()
  if #queue > 0 and os.time() - lastRound >= RETRY_AFTER then
    retryQueued()
  end
end

-- At start-up: the studies of the last RecoverChanges changes, if of the last RecoverHours (a
-- restart may have dropped their stable event, or their send failed before it), are routed
-- once more, quietly: a study whose radiographs were all acknowledged costs one look and sends
-- nothing. The hours bound what a first start on an existing PACS sends. From the first
-- failure on, the rest are queued instead.
function Initialize()
  -- Orthanc dates its changes in UTC, as 20220314T101500: such strings compare as times.
  local after = os.date('!%Y%m%dT%H%M%S', os.time() - RECOVER_HOURS * 3600)
  local since = math.max(ParseJson(RestApiGet('/changes?last'))['Last'] - RECOVER_CHANGES, 0)
  local studies = {}
  local seen = {}
  repeat
    local page = ParseJson(RestApiGet('/changes?limit=1000&since=' .. since))
    for _, change in ipairs(page['Changes']) do
      local recent = change['Date'] >= after
      if change['ResourceType'] == 'Study' and recent and not seen[change['ID']] then
        seen[change['ID']] = true
        table.insert(studies, change['ID'])
      end
    end
    since = page['Last']
  until page['Done']
  local sent, failed = 0, false
  for _, studyId in ipairs(studies) do
    if failed then
      enqueue(studyId)
    else
      local outcome = routeStudy(studyId, true)
      if outcome == 'sent' then
        sent = sent + 1
      elseif outcome == 'failed' then
        failed = true
        enqueue(studyId)
      end
    end
  end
  log('start-up: ' .. #studies .. ' recent studies checked, ' .. sent .. ' sent, '
    .. #queue .. ' queued')
end
