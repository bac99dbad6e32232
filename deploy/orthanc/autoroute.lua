-- Orthanc auto-routing to dicom-sorter's listener, with retries.
-- 'sorter' is the DicomModalities entry of orthanc.json (AE SORTER, host, port 11112).
-- Nothing is deleted: Orthanc keeps its copy.
--
-- Each stored instance goes out as an asynchronous Orthanc job (listed in /jobs). A job that fails
-- (the listener down or restarting, its spool below the free-space floor) is resubmitted after
-- SorterRetryDelay seconds, at most SorterMaxRetries times (orthanc.json keys, defaults 60 and 1440:
-- a day of retries). The retries run from OnHeartBeat (Orthanc 1.11.1 and later, with
-- "LuaHeartBeatPeriod" > 0) and, on any version, whenever another instance arrives. Keep
-- "JobsHistorySize" large enough to hold the failed jobs of an outage: Orthanc cannot resubmit a job
-- it has forgotten. After a restart of Orthanc, resubmit what failed by hand: POST /jobs/ID/resubmit.

local config = GetOrthancConfiguration()
local MODALITY = config['SorterModality'] or 'sorter'
local RETRY_DELAY = tonumber(config['SorterRetryDelay'] or 60)
local MAX_RETRIES = tonumber(config['SorterMaxRetries'] or 1440)

-- The jobs this script submitted and has not seen succeed: id -> { tries = n, failedAt = time }
local pending = {}

local function Send(instanceId)
  local request = { Resources = { instanceId }, Asynchronous = true }
  local answer = ParseJson(RestApiPost('/modalities/' .. MODALITY .. '/store', DumpJson(request, true)))
  pending[answer['ID']] = { tries = 0 }
end

local function RetryDue()
  local now = os.time()
  for jobId, job in pairs(pending) do
    if job.failedAt ~= nil and now - job.failedAt >= RETRY_DELAY then
      if job.tries >= MAX_RETRIES then
        print('dicom-sorter: job ' .. jobId .. ' failed ' .. (job.tries + 1) ..
              ' times, not retried again; resubmit it with POST /jobs/' .. jobId .. '/resubmit')
        pending[jobId] = nil
      else
        job.tries = job.tries + 1
        job.failedAt = nil
        RestApiPost('/jobs/' .. jobId .. '/resubmit', '')
      end
    end
  end
end

function OnStoredInstance(instanceId, tags, metadata, origin)
  -- Instances Orthanc creates itself from Lua (modify, anonymize) are not forwarded twice.
  if origin ~= nil and origin['RequestOrigin'] == 'Lua' then
    return
  end
  Send(instanceId)
  RetryDue()
end

function OnJobFailure(jobId)
  local job = pending[jobId]
  if job ~= nil then
    job.failedAt = os.time()
  end
end

function OnJobSuccess(jobId)
  pending[jobId] = nil
end

function OnHeartBeat()
  RetryDue()
end
