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

local settings = GetOrthancConfiguration()['MskTriage'] or {}
local TARGET = settings['Modality'] or 'triage'
local OWN_MANUFACTURER = settings['OwnManufacturer'] or 'msk-triage'
local ROUTED = settings['RoutedMetadata'] or 'MskTriageRouted'
local ROUTE_MODALITIES = {}
for _, modality in ipairs(settings['RouteModalities'] or { 'CR', 'DX' }) do
  ROUTE_MODALITIES[string.upper(modality)] = true
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

-- True when the instance was already acknowledged by msk-triage.
local function alreadyRouted(instanceId)
  local names = ParseJson(RestApiGet('/instances/' .. instanceId .. '/metadata'))
  for _, name in ipairs(names or {}) do
    if name == ROUTED then
      return true
    end
  end
  return false
end

function OnStableStudy(studyId, tags, metadata)
  -- Modified or anonymized copies are derived data, not what a modality acquired.
  if metadata['ModifiedFrom'] ~= nil or metadata['AnonymizedFrom'] ~= nil then
    return
  end
  local pending = {}
  local skipped = 0
  for _, series in ipairs(ParseJson(RestApiGet('/studies/' .. studyId .. '/series'))) do
    local reason = skipReason(series)
    if reason ~= nil then
      skipped = skipped + #series['Instances']
    else
      for _, instanceId in ipairs(series['Instances']) do
        if alreadyRouted(instanceId) then
          skipped = skipped + 1
        else
          table.insert(pending, instanceId)
        end
      end
    end
  end
  if #pending == 0 then
    log('study ' .. studyId .. ': nothing to send (' .. skipped .. ' instances skipped)')
    return
  end
  -- Synchronous, so that the instances are marked only once msk-triage acknowledged them.
  local body = DumpJson({ Resources = pending, Synchronous = true }, true)
  local answer = RestApiPost('/modalities/' .. TARGET .. '/store', body)
  if answer == nil then
    -- Not marked: the next stable event of this study, or a manual
    -- POST /modalities/<TARGET>/store, sends them again.
    log('study ' .. studyId .. ': sending ' .. #pending .. ' instances to ' .. TARGET .. ' FAILED')
    return
  end
  local stamp = os.date('!%Y%m%dT%H%M%SZ')
  for _, instanceId in ipairs(pending) do
    RestApiPut('/instances/' .. instanceId .. '/metadata/' .. ROUTED, stamp)
  end
  log('study ' .. studyId .. ': sent ' .. #pending .. ' instances to ' .. TARGET
    .. ' (' .. skipped .. ' skipped)')
end
